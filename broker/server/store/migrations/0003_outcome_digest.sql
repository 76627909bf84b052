-- Waystation server store, schema version 3: change digests and store incarnations.
-- An outcome's `dev` is now a namespace: the device id, or "device/incarnation"
-- (broker/server/identity.py); `d` is the digest of the change's content, empty for
-- outcomes stored before this version.
ALTER TABLE outcomes ADD COLUMN d text NOT NULL DEFAULT '';
