// Package pgstore is the broker's store in PostgreSQL, shared by several
// broker replicas behind one address.
//
// Every operation the embedded store makes atomic is one transaction here,
// with the locks that make it atomic across replicas too: a spent nonce is
// a primary key, an appraisal holds its node's row lock, enrollment
// bookkeeping (which counts rows to enforce caps) takes one advisory lock,
// and audit records take their sequence numbers under the lock of a single
// head row, so their order is the commit order on every replica.
// Transactions run at READ COMMITTED and hold nothing but database work;
// the few whose own statements can race (a first insert of a policy) are
// retried. Every call is bounded by its context's deadline, or by
// Options.Timeout when the context has none.
package pgstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/attested-dev/attested/broker/store"
)

// Defaults of the connection settings a URL may override.
const (
	// DefaultTimeout bounds a call whose context has no deadline.
	DefaultTimeout = 30 * time.Second
	// defaultStatementTimeout and defaultIdleInTx are server-side bounds,
	// for a broker that hangs or loses its connection mid-transaction:
	// PostgreSQL ends the statement or the transaction and releases its
	// locks, so the other replicas do not wait on it.
	defaultStatementTimeout = "30s"
	defaultIdleInTx         = "30s"
	applicationName         = "attested-broker"
)

// Options configure Open.
type Options struct {
	// Logger receives what the store says at start (migrations, TLS
	// warnings); nil discards it.
	Logger *slog.Logger
	// Timeout bounds calls whose context has no deadline; zero means
	// DefaultTimeout.
	Timeout time.Duration
}

// Store is the PostgreSQL store.
type Store struct {
	pool    *pgxpool.Pool
	timeout time.Duration
	log     *slog.Logger

	auditMu    sync.Mutex
	auditQueue []auditReq
	auditBusy  bool
	auditIdle  *sync.Cond
}

var _ store.Store = (*Store)(nil)

// Open connects to the database rawURL names, brings its schema up to date
// (once, however many replicas start together) and returns the store.
// The URL is a libpq connection URL: TLS through sslmode, sslrootcert,
// sslcert and sslkey; pool bounds through pool_max_conns and the other
// pgxpool parameters; server settings such as statement_timeout as
// parameters. It may not carry a password (see checkNoSecret).
func Open(ctx context.Context, rawURL string, o Options) (*Store, error) {
	red := Redact(rawURL)
	if !IsURL(rawURL) {
		return nil, fmt.Errorf("store: %q is not a PostgreSQL URL (postgres://...)", red)
	}
	if err := checkNoSecret(rawURL); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	cfg, err := pgxpool.ParseConfig(rawURL)
	if err != nil {
		// pgx masks passwords in its parse errors; the URL carries none.
		return nil, fmt.Errorf("store: %s: %w", red, err)
	}
	_, query, _ := strings.Cut(rawURL, "?")
	params, _ := url.ParseQuery(query)
	if !params.Has("pool_max_conns") {
		// Every unwrap makes a few short queries; a pool too small for
		// the gRPC handlers in flight queues them.
		cfg.MaxConns = int32(max(8, 4*runtime.NumCPU()))
	}
	rt := cfg.ConnConfig.RuntimeParams
	for k, v := range map[string]string{
		"application_name":                    applicationName,
		"statement_timeout":                   defaultStatementTimeout,
		"idle_in_transaction_session_timeout": defaultIdleInTx,
	} {
		if _, set := rt[k]; !set {
			rt[k] = v
		}
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	sslmode := params.Get("sslmode")
	if !params.Has("sslmode") {
		sslmode = os.Getenv("PGSSLMODE")
	}
	warnTLS(log, cfg.ConnConfig, sslmode, red)
	timeout := o.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("store: %s: %w", red, err)
	}
	s := &Store{pool: pool, timeout: timeout, log: log}
	s.auditIdle = sync.NewCond(&s.auditMu)
	if err := s.migrate(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("store: PostgreSQL at %s: %w", red, err)
	}
	log.Info("store: PostgreSQL", "url", red, "maxConns", cfg.MaxConns)
	return s, nil
}

// warnTLS says at every start when the connection to a database on
// another machine is not authenticated: whoever can change what the broker
// reads there (sessions, nodes, policies) can have keys released.
func warnTLS(log *slog.Logger, c *pgx.ConnConfig, sslmode, red string) {
	if sslmode == "" {
		sslmode = "prefer" // libpq's default, and pgx's
	}
	if sslmode == "verify-full" || sslmode == "verify-ca" {
		return
	}
	local := func(h string) bool {
		return strings.HasPrefix(h, "/") || h == "localhost" || h == "127.0.0.1" || h == "::1"
	}
	remote := !local(c.Host)
	for _, fb := range c.Fallbacks {
		remote = remote || !local(fb.Host)
	}
	if remote {
		log.Warn("SECURITY: the connection to PostgreSQL is not authenticated by TLS (sslmode="+sslmode+"): "+
			"whoever can intercept it can read and change the broker's nodes, sessions and policies, and so have keys released. "+
			"Set sslmode=verify-full with sslrootcert naming the CA of the database server's certificate.", "url", red)
	}
}

// Close waits for audit records being written and closes the pool.
func (s *Store) Close() error {
	s.auditMu.Lock()
	for s.auditBusy {
		s.auditIdle.Wait()
	}
	s.auditMu.Unlock()
	s.pool.Close()
	return nil
}

// bound gives ctx the store's timeout when it has no deadline of its own.
func (s *Store) bound(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, s.timeout)
}

// maxRetries bounds the retries of a transaction that failed on a
// serialization failure, a deadlock or a race on a unique key.
const maxRetries = 5

// retryable reports whether a transaction that failed with err can be run
// again from the start and may succeed.
func retryable(err error) bool {
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		return false
	}
	switch pe.Code {
	case "40001", "40P01": // serialization_failure, deadlock_detected
		return true
	}
	return false
}

// tx runs fn in a transaction, committing if it returns nil; fn's context
// is ctx bounded as every call is. fn must only
// do database work: it may run again when PostgreSQL aborts the
// transaction for a serialization failure or deadlock (and when retry
// says so of another error).
func (s *Store) tx(ctx context.Context, retry func(error) bool, fn func(context.Context, pgx.Tx) error) error {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	for attempt := 0; ; attempt++ {
		err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return fn(ctx, tx) })
		if err == nil || attempt >= maxRetries || ctx.Err() != nil || !(retryable(err) || (retry != nil && retry(err))) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Duration(attempt+1) * 5 * time.Millisecond):
		}
	}
}

// txOnce runs fn in a transaction once: for transactions that call a
// caller's function, whose effects outside the database are not ours to
// repeat. They take their row locks in one order (node, then sessions), so
// they do not deadlock one another.
func (s *Store) txOnce(ctx context.Context, fn func(context.Context, pgx.Tx) error) error {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return fn(ctx, tx) })
}

// isUnique reports a unique_violation.
func isUnique(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "23505"
}

// notFound maps "no rows" to store.ErrNotFound, which callers compare by
// identity.
func notFound(err error) error {
	if errors.Is(err, pgx.ErrNoRows) {
		return store.ErrNotFound
	}
	return err
}

// enrollLock serializes enrollment bookkeeping across replicas: the caps
// on pending and in-flight enrollments count rows, and a node's name and
// EK are checked against nodes and pending enrollments together. These
// are rare operations; one lock keeps them as simple as the embedded
// store's single writer.
const enrollLock = int64(0x61747465_73746564) // "attested"

func lockEnroll(ctx context.Context, tx pgx.Tx) error {
	_, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", enrollLock)
	return err
}
