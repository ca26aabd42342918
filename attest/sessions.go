package attest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/renameio/v2"

	"github.com/attested-dev/attested/attest/localfile"
)

// Sessions hands out a valid session, attesting only when there is none:
// concurrent callers in one process share one in-flight attestation, and
// with a FileStore so do separate processes (exec mode runs one per layer).
type Sessions struct {
	Broker Appraiser
	State  *State
	// TPM opens the node's TPM for one operation. The TPM is opened per use
	// because swtpm serves one connection at a time.
	TPM func(ctx context.Context) (*TPM, error)
	// Store shares sessions across processes; nil keeps them in memory.
	Store *FileStore
	// Logs are sent with every quote.
	Logs Logs
	Now  func() time.Time
	// Observe, when set, is told of every attestation: the new session's
	// expiry, or why it failed (metrics).
	Observe func(expires time.Time, err error)
	// Linger keeps the TPM open this long after its last use, so the
	// layers of a pull share one connection and one loaded session key
	// (a long-running agent sets it). Zero closes the TPM after each use.
	// swtpm serves one connection at a time: other processes on the node
	// wait up to this long for it.
	Linger time.Duration

	// turn admits one caller at a time; a channel rather than a mutex so a
	// caller gives up when its context ends instead of queueing forever
	// behind a stuck attestation.
	turnOnce sync.Once
	turn     chan struct{}
	cur      *Session
	// open is the TPM kept between uses while lingering; idle closes it.
	// Both belong to whoever holds turn.
	open *TPM
	idle *time.Timer
	// checked is when the last TPM check that found cur valid (or the
	// attestation that made it) began.
	checked time.Time
	// failed is the last failure of a holder of turn (TPM or
	// attestation), and when: a caller that gave up waiting for turn
	// reports it rather than only that it waited.
	failed   error
	failedAt time.Time
	// silentAt is when the TPM last left a command unanswered until the
	// deadline.
	silentAt time.Time
}

func (m *Sessions) acquire(ctx context.Context) error {
	arrived := time.Now()
	m.turnOnce.Do(func() { m.turn = make(chan struct{}, 1) })
	select {
	case m.turn <- struct{}{}:
		return nil
	case <-ctx.Done():
		// The holder most likely ran into the same deadline (a TPM that
		// stopped answering): its failure is the one to report.
		select {
		case m.turn <- struct{}{}:
			err, at := m.failed, m.failedAt
			m.release()
			if err != nil && !at.Before(arrived) {
				return err
			}
		case <-time.After(lockGrace):
		}
		return fmt.Errorf("attest: waiting for this node's attestation in progress: %w", ctx.Err())
	}
}

// silence notes, for the holder of turn, whether the TPM (t, or the one
// err came from) left a command unanswered until the deadline.
func (m *Sessions) silence(t *TPM, err error) bool {
	if (t != nil && t.Silent()) || isSilent(err) {
		m.silentAt = time.Now()
		return true
	}
	return false
}

// fail records the failure of the holder of turn and returns it.
func (m *Sessions) fail(err error) error {
	if err != nil {
		m.failed, m.failedAt = err, time.Now()
	}
	return err
}

func (m *Sessions) release() { <-m.turn }

// useTPM returns the TPM for one use by the holder of turn: the lingering
// one, now bounded by ctx (reused), or a new one.
func (m *Sessions) useTPM(ctx context.Context) (t *TPM, reused bool, err error) {
	if t := m.open; t != nil {
		m.open = nil
		m.idle.Stop()
		t.bound(ctx)
		return t, true, nil
	}
	t, err = m.TPM(ctx)
	return t, false, err
}

// withTPM runs op, which must be safe to repeat, on the TPM for the holder
// of turn. A lingering connection may have died while idle (swtpm
// restarted, the node resumed): op failing on one runs once more on a new
// connection.
func (m *Sessions) withTPM(ctx context.Context, op func(*TPM) error) error {
	return m.fail(m.tryTPM(ctx, op))
}

func (m *Sessions) tryTPM(ctx context.Context, op func(*TPM) error) error {
	t, reused, err := m.useTPM(ctx)
	if err != nil {
		m.silence(nil, err)
		return err
	}
	err = op(t)
	// (Not once the deadline has passed: a TPM that used it up is the
	// failure, not the dial that follows.)
	if err != nil && reused && ctx.Err() == nil && !m.silence(t, err) && !errors.Is(err, ErrSessionKeyLocked) {
		t.Close()
		if t, err = m.TPM(ctx); err != nil {
			m.silence(nil, err)
			return err
		}
		err = op(t)
	}
	if err != nil {
		m.silence(t, err)
	}
	m.doneTPM(t, err)
	return err
}

// doneTPM ends the holder of turn's use of t: it lingers if the use went
// well, and is closed otherwise, so a TPM that failed is dialled afresh.
func (m *Sessions) doneTPM(t *TPM, err error) {
	if m.Linger <= 0 || (err != nil && !errors.Is(err, ErrSessionKeyLocked)) {
		t.Close()
		return
	}
	m.open = t
	var idle *time.Timer
	idle = time.AfterFunc(m.Linger, func() {
		m.turn <- struct{}{}
		if m.idle == idle && m.open == t {
			m.open = nil
			t.Close()
		}
		m.release()
	})
	m.idle = idle
}

// Close closes a TPM kept open by Linger.
func (m *Sessions) Close() {
	m.turnOnce.Do(func() { m.turn = make(chan struct{}, 1) })
	m.turn <- struct{}{}
	if m.open != nil {
		m.idle.Stop()
		m.open.Close()
		m.open = nil
	}
	m.release()
}

// Get returns a session valid for this node's current state.
func (m *Sessions) Get(ctx context.Context) (*Session, error) {
	arrived := time.Now()
	if err := m.acquire(ctx); err != nil {
		return nil, err
	}
	defer m.release()
	// A TPM that stopped answering while this call waited for its turn
	// failed this pull (its layers share one deadline); asking it again
	// would only spend what is left of the deadline on a dial.
	if m.failed != nil && !m.silentAt.Before(arrived) {
		return nil, m.failed
	}
	now := time.Now
	if m.Now != nil {
		now = m.Now
	}
	// Concurrent layers of one pull share the TPM check: a check that
	// began after this call arrived already saw the node as it is now.
	if m.Store == nil && m.cur != nil && m.checked.After(arrived) && now().Add(ExpiryMargin).Before(m.cur.Expires) {
		return m.cur, nil
	}
	if m.Store != nil {
		// Warm path: a stored session the TPM still vouches for needs no
		// lock (Save replaces the file whole), so the processes of one
		// pull do not queue behind each other.
		if cur := m.Store.Load(); m.mine(cur) {
			checking := time.Now()
			ok, err := m.stillValid(ctx, cur, now())
			if err == nil && ok {
				return cur, nil
			}
			if err != nil && (ctx.Err() != nil || !m.silentAt.Before(checking)) {
				// The TPM took the whole deadline: that is this pull's
				// failure, not the lock it no longer has time to take.
				return nil, err
			}
		}
		started := time.Now()
		unlock, err := m.Store.Lock(ctx)
		if err != nil {
			// The lock holder is attesting for this pull; its failure is
			// the one the operator needs to see.
			if held := m.Store.failureSince(started, lockGrace); held != "" {
				return nil, fmt.Errorf("attest: %s", held)
			}
			return nil, fmt.Errorf("%w (another attested process on this node is attesting and has not finished; is the broker reachable?)", err)
		}
		defer unlock()
		// An attestation that failed while we waited was this pull's
		// attempt: share its outcome rather than try again with what is
		// left of our deadline.
		if held := m.Store.failureSince(started, 0); held != "" {
			return nil, fmt.Errorf("attest: %s", held)
		}
		m.cur = m.Store.Load()
	}
	// A TPM failure is this pull's outcome too: processes waiting on the
	// lock must read it rather than guess at the broker.
	failed := func(err error) (*Session, error) {
		if m.Store != nil {
			m.Store.recordFailure(err)
		}
		return nil, m.fail(err)
	}
	checkStart := time.Now()
	if m.mine(m.cur) {
		ok, err := m.stillValid(ctx, m.cur, now())
		if err != nil {
			return failed(err)
		}
		if ok {
			m.checked = checkStart
			return m.cur, nil
		}
	}
	// The current session no longer describes this node: nobody may reuse
	// it, whatever happens next.
	m.cur = nil
	t, _, err := m.useTPM(ctx)
	if err != nil {
		m.silence(nil, err)
		return failed(err)
	}
	s, err := NewSession(ctx, m.Broker, t, m.State, m.Logs)
	if err != nil {
		m.silence(t, err)
	}
	m.doneTPM(t, err)
	if m.Store != nil {
		m.Store.recordFailure(err)
	}
	if m.Observe != nil {
		var expires time.Time
		if s != nil {
			expires = s.Expires
		}
		m.Observe(expires, err)
	}
	if err != nil {
		return nil, m.fail(err)
	}
	m.cur, m.checked = s, checkStart
	if m.Store != nil {
		if err := m.Store.Save(s); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// mine says whether s is a session of this node with its broker.
func (m *Sessions) mine(s *Session) bool {
	return s != nil && s.Broker == m.State.Broker && s.Node == m.State.Name
}

// stillValid checks s against the TPM's current state, for the holder of
// turn.
func (m *Sessions) stillValid(ctx context.Context, s *Session, now time.Time) (bool, error) {
	var plat Platform
	err := m.withTPM(ctx, func(t *TPM) (err error) {
		plat, err = t.ReadPlatform()
		return err
	})
	if err != nil {
		return false, err
	}
	return s.StillValid(now, plat), nil
}

// Invalidate drops s if it is still the current session, e.g. after the
// broker said it ended.
func (m *Sessions) Invalidate(ctx context.Context, s *Session) error {
	if err := m.acquire(ctx); err != nil {
		return err
	}
	defer m.release()
	if m.cur != nil && bytes.Equal(m.cur.Token, s.Token) {
		m.cur = nil
	}
	if m.Store == nil {
		return nil
	}
	unlock, err := m.Store.Lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	if cur := m.Store.Load(); cur != nil && bytes.Equal(cur.Token, s.Token) {
		return m.Store.Delete()
	}
	return nil
}

// Open decrypts a release sealed to s. The TPM half of the session key
// works only while its PCRs hold: if they moved, the session is dropped and
// ErrSessionKeyLocked returned, so the caller attests again.
func (m *Sessions) Open(ctx context.Context, s *Session, key string, version uint32, sealed []byte) ([]byte, error) {
	return m.openWith(ctx, s, func(t *TPM) ([]byte, error) { return s.Open(t, key, version, sealed) })
}

// OpenSealed decrypts a non-key answer the broker sealed to s under info.
func (m *Sessions) OpenSealed(ctx context.Context, s *Session, info, sealed []byte) ([]byte, error) {
	return m.openWith(ctx, s, func(t *TPM) ([]byte, error) { return s.open(t, info, sealed) })
}

func (m *Sessions) openWith(ctx context.Context, s *Session, open func(*TPM) ([]byte, error)) ([]byte, error) {
	// One TPM user at a time in this process: swtpm serves one connection.
	if err := m.acquire(ctx); err != nil {
		return nil, err
	}
	var out []byte
	err := m.withTPM(ctx, func(t *TPM) (err error) {
		out, err = open(t)
		return err
	})
	m.release()
	if errors.Is(err, ErrSessionKeyLocked) {
		if ierr := m.Invalidate(ctx, s); ierr != nil {
			return nil, ierr
		}
	}
	return out, err
}

// FileStore keeps the session in a directory, which should be on tmpfs
// (/run/attested) so a session never outlives a reboot on disk. The file is
// 0600 in a 0700 directory. It holds no usable private key: the session
// key's TPM half opens only in this TPM while its PCRs hold. The directory
// and every file in it must belong to this user and be closed to others;
// anything else (a planted lock symlink, a failure text from another user)
// is refused rather than followed.
type FileStore struct {
	Dir string
}

const (
	sessionFile = "session.json"
	lockFile    = "session.lock"
	failureFile = "attest-failure.json"
	// lockGrace is how long a process that gave up waiting for the lock
	// waits for the holder's verdict; the exec watchdog allows more.
	lockGrace = time.Second
	// maxStateFile bounds what is read back from the directory.
	maxStateFile = 64 << 10
)

type failure struct {
	Time    time.Time `json:"time"`
	Message string    `json:"message"`
}

func (f *FileStore) dir() error {
	if err := localfile.EnsureDir(f.Dir); err != nil {
		return fmt.Errorf("attest: session directory: %w", err)
	}
	return nil
}

// recordFailure leaves the outcome of an attestation for processes that
// waited on it: the error text (which never holds secrets), or nothing.
func (f *FileStore) recordFailure(err error) {
	p := filepath.Join(f.Dir, failureFile)
	if err == nil {
		os.Remove(p)
		return
	}
	data, _ := json.Marshal(failure{Time: time.Now(), Message: err.Error()})
	renameio.WriteFile(p, data, 0o600)
}

// failureSince waits up to grace for a failure recorded after since.
func (f *FileStore) failureSince(since time.Time, grace time.Duration) string {
	deadline := time.Now().Add(grace)
	for {
		var fl failure
		if data, err := localfile.ReadFile(filepath.Join(f.Dir, failureFile), maxStateFile); err == nil &&
			json.Unmarshal(data, &fl) == nil && !fl.Time.Before(since) {
			return strings.TrimPrefix(fl.Message, "attest: ")
		}
		if time.Now().After(deadline) {
			return ""
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Lock takes the cross-process lock, waiting at most until ctx ends.
func (f *FileStore) Lock(ctx context.Context) (func(), error) {
	if err := f.dir(); err != nil {
		return nil, err
	}
	fd, err := localfile.Open(filepath.Join(f.Dir, lockFile), os.O_CREATE|os.O_RDWR)
	if err != nil {
		return nil, fmt.Errorf("attest: session lock: %w", err)
	}
	// flock blocks until the holder lets go, and cannot be interrupted:
	// it waits aside, and a caller whose context ends first leaves the
	// lock to be released as soon as it is taken.
	unlock := func() { syscall.Flock(int(fd.Fd()), syscall.LOCK_UN); fd.Close() }
	got := make(chan error, 1)
	go func() { got <- syscall.Flock(int(fd.Fd()), syscall.LOCK_EX) }()
	select {
	case err := <-got:
		if err != nil {
			fd.Close()
			return nil, fmt.Errorf("attest: session lock: %w", err)
		}
		return unlock, nil
	case <-ctx.Done():
		go func() {
			if <-got == nil {
				unlock()
			} else {
				fd.Close()
			}
		}()
		return nil, fmt.Errorf("attest: waiting for another attestation on this node: %w", ctx.Err())
	}
}

// Load returns the stored session, or nil if there is none or it is
// unreadable (a new attestation replaces it).
func (f *FileStore) Load() *Session {
	data, err := localfile.ReadFile(filepath.Join(f.Dir, sessionFile), maxStateFile)
	if err != nil {
		return nil
	}
	var s Session
	if json.Unmarshal(data, &s) != nil || len(s.Token) == 0 {
		return nil
	}
	return &s
}

// Save stores the session atomically.
func (f *FileStore) Save(s *Session) error {
	if err := f.dir(); err != nil {
		return err
	}
	data, err := json.Marshal(s)
	if err != nil {
		return err
	}
	if err := renameio.WriteFile(filepath.Join(f.Dir, sessionFile), data, 0o600); err != nil {
		return fmt.Errorf("attest: save session: %w", err)
	}
	return nil
}

// Delete removes the stored session.
func (f *FileStore) Delete() error {
	err := os.Remove(filepath.Join(f.Dir, sessionFile))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("attest: drop session: %w", err)
	}
	return nil
}

// Refresh attests now, replacing the current session, so the broker keeps
// seeing this node's current state (the agent calls it periodically).
func (m *Sessions) Refresh(ctx context.Context) (*Session, error) {
	if err := m.acquire(ctx); err != nil {
		return nil, err
	}
	m.cur = nil
	m.release()
	if m.Store != nil {
		unlock, err := m.Store.Lock(ctx)
		if err != nil {
			return nil, err
		}
		err = m.Store.Delete()
		unlock()
		if err != nil {
			return nil, err
		}
	}
	return m.Get(ctx)
}
