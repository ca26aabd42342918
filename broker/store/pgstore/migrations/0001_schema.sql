-- The broker's state. Key columns are COLLATE "C" so that order and
-- equality are bytewise whatever the database's locale, as in the embedded
-- store. A record column (json: kept as written, so any string Go encodes,
-- \u0000 included, round-trips) holds what no query looks into.

CREATE TABLE nodes (
	name           text COLLATE "C" PRIMARY KEY,
	ek_fingerprint text COLLATE "C" NOT NULL UNIQUE,
	state          text NOT NULL,
	enrolled_at    timestamptz NOT NULL,
	record         json NOT NULL
);
-- Expire drops pending nodes of databases older than pending enrollments.
CREATE INDEX nodes_pending ON nodes (enrolled_at) WHERE state = 'pending';

-- Credential activations in flight.
CREATE TABLE enrollments (
	id      text COLLATE "C" PRIMARY KEY,
	expires timestamptz NOT NULL,
	record  json NOT NULL
);
CREATE INDEX enrollments_expires ON enrollments (expires);

-- Enrollments waiting for an admin's approval: one per EK.
CREATE TABLE pending (
	ek_fingerprint text COLLATE "C" PRIMARY KEY,
	name           text COLLATE "C" NOT NULL,
	enrolled_at    timestamptz NOT NULL,
	expires        timestamptz NOT NULL,
	record         json NOT NULL
);
CREATE INDEX pending_name ON pending (name);
CREATE INDEX pending_expires ON pending (expires);

CREATE TABLE join_tokens (
	hash    bytea PRIMARY KEY,
	expires timestamptz NOT NULL
);
CREATE INDEX join_tokens_expires ON join_tokens (expires);

-- Answered challenges, kept until they expire: the primary key is what
-- makes a nonce single-use across replicas.
CREATE TABLE spent_nonces (
	nonce   bytea PRIMARY KEY,
	expires timestamptz NOT NULL
);
CREATE INDEX spent_nonces_expires ON spent_nonces (expires);

-- Sessions by token hash (every unwrap), by node (appraisals, revocation).
-- Removing a node removes its sessions.
CREATE TABLE sessions (
	token_hash bytea PRIMARY KEY,
	node       text COLLATE "C" NOT NULL REFERENCES nodes (name) ON DELETE CASCADE,
	expires    timestamptz NOT NULL,
	record     json NOT NULL
);
CREATE INDEX sessions_node ON sessions (node, expires);
CREATE INDEX sessions_expires ON sessions (expires);

-- Wrapping keys, one row per version; the private part is sealed under
-- the broker's master key before it gets here.
CREATE TABLE keys (
	name    text COLLATE "C" NOT NULL,
	version bigint NOT NULL,
	record  json NOT NULL,
	PRIMARY KEY (name, version)
);

CREATE TABLE policies (
	name     text COLLATE "C" PRIMARY KEY,
	revision bigint NOT NULL,
	record   json NOT NULL
);

-- The audit trail. seq is assigned under the lock of audit_head's one row,
-- taken by the transaction that inserts the records and held until it
-- commits: sequence numbers have no gaps and follow commit order across
-- every replica (a chain over the records can be computed in that order).
CREATE TABLE audit (
	seq     bigint PRIMARY KEY,
	time    timestamptz NOT NULL,
	kind    text COLLATE "C" NOT NULL,
	node    text COLLATE "C" NOT NULL DEFAULT '',
	key     text COLLATE "C" NOT NULL DEFAULT '',
	allowed boolean NOT NULL,
	reason  text NOT NULL DEFAULT '',
	actor   text NOT NULL DEFAULT ''
);
CREATE INDEX audit_time ON audit (time);
CREATE INDEX audit_node ON audit (node, seq);
CREATE INDEX audit_key ON audit (key, seq);
CREATE INDEX audit_kind ON audit (kind, seq);

CREATE TABLE audit_head (
	id  integer PRIMARY KEY CHECK (id = 1),
	seq bigint NOT NULL
);
INSERT INTO audit_head (id, seq) VALUES (1, 0);
