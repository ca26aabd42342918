package keyprovider

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/google/renameio/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/fsperm"
	"github.com/attested-dev/attested/broker/keysig"
)

// KeyFetcher is the broker's public-key API.
type KeyFetcher interface {
	GetWrappingKey(ctx context.Context, in *apiv1.GetWrappingKeyRequest, opts ...grpc.CallOption) (*apiv1.WrappingKey, error)
}

// DefaultKeyTTL is how long a fetched public key is used before asking the
// broker again (a rotated key is picked up within it).
const DefaultKeyTTL = 10 * time.Minute

// maxCacheEntry bounds a cache file; real ones are a few KiB.
const maxCacheEntry = 64 << 10

// BrokerKeys fetches public keys from the broker and caches them on disk,
// so a pipeline keeps encrypting for a known key when the broker is briefly
// unreachable; an unknown key or no cache is a clear error.
//
// Every key, from the wire or the cache, is used only if the broker's
// signature over it verifies against CA, the broker CA the TLS connection
// pins: whoever can write the cache, or answer in the broker's place, still
// cannot make keywrap seal a layer key to a key of theirs. The cache must
// also belong to the running user (or root) and be writable by nobody
// else; otherwise it is refused, not used.
type BrokerKeys struct {
	Broker KeyFetcher
	// CA is the broker CA (the pinned TLS root); keys must chain to it.
	CA *x509.CertPool
	// Addr identifies the broker in the cache.
	Addr string
	// CacheDir holds cached public keys; empty disables the cache.
	CacheDir string
	TTL      time.Duration
	Now      func() time.Time
	// Warn receives notices a user should see (a cache entry not used);
	// stderr when nil.
	Warn func(msg string)
}

type cachedKey struct {
	Fetched time.Time `json:"fetched"`
	// The key's public fields, in plain JSON rather than protobuf.
	Name        string   `json:"name"`
	Version     uint32   `json:"version"`
	Suite       string   `json:"suite"`
	PublicKey   []byte   `json:"publicKey"`
	BrokerID    string   `json:"brokerId"`
	Signature   []byte   `json:"signature"`
	SignerChain [][]byte `json:"signerChain"`
}

func (b *BrokerKeys) keysDir() string {
	sum := sha256.Sum256([]byte(b.Addr))
	return filepath.Join(b.CacheDir, "keys", hex.EncodeToString(sum[:8]))
}

func (b *BrokerKeys) path(name string) string {
	return filepath.Join(b.keysDir(), name+".json")
}

func (b *BrokerKeys) now() time.Time {
	if b.Now != nil {
		return b.Now()
	}
	return time.Now()
}

func (b *BrokerKeys) warn(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if b.Warn != nil {
		b.Warn(msg)
		return
	}
	fmt.Fprintln(os.Stderr, "attested: warning: "+msg)
}

// WrappingKey implements KeySource.
func (b *BrokerKeys) WrappingKey(ctx context.Context, name string) (*apiv1.WrappingKey, error) {
	ttl := b.TTL
	if ttl <= 0 {
		ttl = DefaultKeyTTL
	}
	cached, err := b.load(name)
	if err != nil {
		return nil, err
	}
	var notUsed error
	if cached != nil {
		if err := b.verify(cached.key(), name); err != nil {
			notUsed = fmt.Errorf("cached copy %q not used: %w", b.path(name), err)
			b.warn("%v", notUsed)
			cached = nil
		}
	}
	// A fetched time in the future is stale, never fresh for good.
	if cached != nil {
		if age := b.now().Sub(cached.Fetched); age >= 0 && age < ttl {
			return cached.key(), nil
		}
	}
	wk, err := b.Broker.GetWrappingKey(ctx, &apiv1.GetWrappingKeyRequest{Name: name})
	if err != nil {
		code := status.Code(err)
		if cached != nil && (code == codes.Unavailable || code == codes.DeadlineExceeded) {
			// Only an unreachable broker falls back; a broker that says the
			// key is gone is believed.
			return cached.key(), nil
		}
		if notUsed != nil {
			return nil, fmt.Errorf("%w (%v)", err, notUsed)
		}
		return nil, err
	}
	if err := b.verify(wk, name); err != nil {
		if errors.Is(err, keysig.ErrUnsigned) {
			return nil, fmt.Errorf("broker %q sent wrapping key %q unsigned, and unsigned keys are refused: a broker initialised before wrapping keys were signed needs a signing certificate (an admin runs 'attested broker issue-signer' on the broker host, then restarts it)", wk.GetBrokerId(), name)
		}
		return nil, fmt.Errorf("wrapping key %q from broker %q refused: %w", name, wk.GetBrokerId(), err)
	}
	b.save(wk)
	return wk, nil
}

// verify checks a key's broker signature against the pinned CA.
func (b *BrokerKeys) verify(wk *apiv1.WrappingKey, name string) error {
	if wk.GetName() != name {
		return fmt.Errorf("it is key %q, not %q", wk.GetName(), name)
	}
	if b.CA == nil {
		return errors.New("no broker CA is configured to verify wrapping keys against (--broker-ca)")
	}
	return keysig.Verify(wk, b.CA, b.now())
}

func (c *cachedKey) key() *apiv1.WrappingKey {
	return &apiv1.WrappingKey{Name: c.Name, Version: c.Version, Suite: c.Suite, PublicKey: c.PublicKey, BrokerId: c.BrokerID,
		Signature: c.Signature, SignerChain: c.SignerChain}
}

// checkCacheDirs refuses cache directories another user owns or may write:
// the cache directory itself (followed if it is a link an admin made) and
// the ones this code creates under it (never links). Missing ones are fine.
func (b *BrokerKeys) checkCacheDirs() error {
	dirs := []string{b.CacheDir, filepath.Join(b.CacheDir, "keys"), b.keysDir()}
	for i, d := range dirs {
		stat := os.Lstat
		if i == 0 {
			stat = os.Stat
		}
		fi, err := stat(d)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return cacheRefused(err)
		}
		if !fi.IsDir() {
			return cacheRefused(fmt.Errorf("%q is not a directory", d))
		}
		if err := fsperm.Check(d, fi, fsperm.NotWritable); err != nil {
			return cacheRefused(err)
		}
	}
	return nil
}

func cacheRefused(err error) error {
	return fmt.Errorf("key cache refused: %w (a cache another user can write could hand keywrap an attacker's key; fix it or point --cache-dir elsewhere)", err)
}

// load returns the cached entry for name, nil if there is none or it does
// not parse, and an error if the cache is not safe to read.
func (b *BrokerKeys) load(name string) (*cachedKey, error) {
	if b.CacheDir == "" {
		return nil, nil
	}
	if err := b.checkCacheDirs(); err != nil {
		return nil, err
	}
	p := b.path(name)
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return nil, cacheRefused(fmt.Errorf("%q is a symbolic link", p))
		}
		return nil, cacheRefused(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, cacheRefused(err)
	}
	if !fi.Mode().IsRegular() {
		return nil, cacheRefused(fmt.Errorf("%q is not a regular file", p))
	}
	if err := fsperm.Check(p, fi, fsperm.NotWritable); err != nil {
		return nil, cacheRefused(err)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxCacheEntry+1))
	if err != nil {
		return nil, cacheRefused(err)
	}
	var c cachedKey
	if len(data) > maxCacheEntry || json.Unmarshal(data, &c) != nil {
		b.warn("cached key %q does not parse; fetching it again", p)
		return nil, nil
	}
	return &c, nil
}

// save is best effort: a read-only cache must not fail a build.
func (b *BrokerKeys) save(wk *apiv1.WrappingKey) {
	if b.CacheDir == "" {
		return
	}
	c := cachedKey{Fetched: b.now(), Name: wk.GetName(), Version: wk.GetVersion(), Suite: wk.GetSuite(),
		PublicKey: wk.GetPublicKey(), BrokerID: wk.GetBrokerId(), Signature: wk.GetSignature(), SignerChain: wk.GetSignerChain()}
	data, err := json.Marshal(c)
	if err != nil {
		return
	}
	p := b.path(wk.GetName())
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		b.warn("cannot cache key %q: %v", wk.GetName(), err)
		return
	}
	if err := b.checkCacheDirs(); err != nil {
		b.warn("not caching key %q: %v", wk.GetName(), err)
		return
	}
	if err := renameio.WriteFile(p, data, 0o600); err != nil {
		b.warn("cannot cache key %q: %v", wk.GetName(), err)
	}
}
