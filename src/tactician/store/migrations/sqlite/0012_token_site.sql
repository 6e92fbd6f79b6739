-- A token made for one edge site (`tactician tokens create --site NAME`): it may act at the
-- centre only as that site's agent (pull its bundle, sync its chain, lease its tokens).
ALTER TABLE tokens ADD COLUMN site TEXT;
