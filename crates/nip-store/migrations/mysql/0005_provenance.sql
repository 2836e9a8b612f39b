-- Provenance of each narinfo: the key whose signature vouched for it (an upstream key, or a
-- trusted upload key) and the API key that uploaded it. `origin` keeps the upstream URL or 'upload'.
ALTER TABLE narinfos ADD COLUMN signed_by VARCHAR(255);
ALTER TABLE narinfos ADD COLUMN uploaded_by VARCHAR(255);
