-- At the centre: the edits an approver's vote on a site's approval asks for (a JSON object of
-- the fields the site's rule lets an approver change); the site's gate checks them.
ALTER TABLE site_votes ADD COLUMN edits TEXT NOT NULL DEFAULT '{}';
