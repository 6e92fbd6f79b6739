-- At an agent: a lease given up here (spent, expired or not needed) stays, with the tokens it
-- hands back unspent, until the centre has heard the return, so that a return the link
-- dropped is sent again after a restart too (NULL: the lease is still held here).
ALTER TABLE agent_leases ADD COLUMN given_back INTEGER;
