-- Webhooks and their durable outbox. A webhook's counters live in its
-- record and change under its row lock; every transaction that touches an
-- outbox locks its webhook first, so they never deadlock.
CREATE TABLE webhooks (
	id     text COLLATE "C" PRIMARY KEY,
	record json NOT NULL
);

-- seq orders each webhook's deliveries: it is drawn under the webhook's
-- row lock, so a later event has a larger one.
CREATE TABLE outbox (
	webhook text COLLATE "C" NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
	seq     bigint GENERATED ALWAYS AS IDENTITY,
	created timestamptz NOT NULL,
	record  json NOT NULL,
	PRIMARY KEY (webhook, seq)
);
CREATE INDEX outbox_created ON outbox (created);
