-- Issue 7: the audit chain, key lifecycle and policy history.
--
-- An audit record names what a release or refusal was about (key version,
-- layer, policy revision) and carries its place in the audit chain: the
-- previous record's hash, its own and that hash's MAC, computed by the
-- broker in the transaction that inserts it, over the record as stored
-- here. Records written before the chain started have none (NULL).
ALTER TABLE audit
	ADD COLUMN key_version     bigint NOT NULL DEFAULT 0,
	ADD COLUMN layer_digest    text NOT NULL DEFAULT '',
	ADD COLUMN policy          text COLLATE "C" NOT NULL DEFAULT '',
	ADD COLUMN policy_revision bigint NOT NULL DEFAULT 0,
	ADD COLUMN chain_prev      bytea,
	ADD COLUMN chain_hash      bytea,
	ADD COLUMN chain_mac       bytea;

-- The chain's MACed checkpoint (count and head), kept on the head row whose
-- lock every append takes (SELECT ... FOR UPDATE) and holds until it
-- commits: records are chained in commit order across replicas, and the
-- checkpoint is rewritten with them. NULL until a broker starts the chain.
ALTER TABLE audit_head ADD COLUMN checkpoint json;

-- Releases and refusals of each key version, counted in the audit append's
-- transaction. Apart from keys, so a count does not rewrite a sealed key.
CREATE TABLE key_counts (
	name     text COLLATE "C" NOT NULL,
	version  bigint NOT NULL,
	releases bigint NOT NULL DEFAULT 0,
	refusals bigint NOT NULL DEFAULT 0,
	PRIMARY KEY (name, version),
	FOREIGN KEY (name, version) REFERENCES keys (name, version) ON DELETE CASCADE
);

-- Every revision of every policy; policies holds the current one. The
-- current revisions of policies applied before this migration are their
-- first kept ones.
CREATE TABLE policy_revisions (
	name     text COLLATE "C" NOT NULL,
	revision bigint NOT NULL,
	record   json NOT NULL,
	PRIMARY KEY (name, revision)
);
INSERT INTO policy_revisions (name, revision, record) SELECT name, revision, record FROM policies;
