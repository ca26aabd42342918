package keyprovider

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/google/renameio/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// KeyFetcher is the broker's public-key API.
type KeyFetcher interface {
	GetWrappingKey(ctx context.Context, in *apiv1.GetWrappingKeyRequest, opts ...grpc.CallOption) (*apiv1.WrappingKey, error)
}

// DefaultKeyTTL is how long a fetched public key is used before asking the
// broker again (a rotated key is picked up within it).
const DefaultKeyTTL = 10 * time.Minute

// BrokerKeys fetches public keys from the broker and caches them on disk,
// so a pipeline keeps encrypting for a known key when the broker is briefly
// unreachable; an unknown key or no cache is a clear error.
type BrokerKeys struct {
	Broker KeyFetcher
	// Addr identifies the broker in the cache.
	Addr string
	// CacheDir holds cached public keys; empty disables the cache.
	CacheDir string
	TTL      time.Duration
	Now      func() time.Time
}

type cachedKey struct {
	Fetched time.Time `json:"fetched"`
	// The key's public fields, in plain JSON rather than protobuf.
	Name      string `json:"name"`
	Version   uint32 `json:"version"`
	Suite     string `json:"suite"`
	PublicKey []byte `json:"publicKey"`
	BrokerID  string `json:"brokerId"`
}

func (b *BrokerKeys) path(name string) string {
	sum := sha256.Sum256([]byte(b.Addr))
	return filepath.Join(b.CacheDir, "keys", hex.EncodeToString(sum[:8]), name+".json")
}

func (b *BrokerKeys) now() time.Time {
	if b.Now != nil {
		return b.Now()
	}
	return time.Now()
}

// WrappingKey implements KeySource.
func (b *BrokerKeys) WrappingKey(ctx context.Context, name string) (*apiv1.WrappingKey, error) {
	ttl := b.TTL
	if ttl <= 0 {
		ttl = DefaultKeyTTL
	}
	cached := b.load(name)
	if cached != nil && b.now().Sub(cached.Fetched) < ttl {
		return cached.key(), nil
	}
	wk, err := b.Broker.GetWrappingKey(ctx, &apiv1.GetWrappingKeyRequest{Name: name})
	if err != nil {
		code := status.Code(err)
		if cached != nil && (code == codes.Unavailable || code == codes.DeadlineExceeded) {
			// Only an unreachable broker falls back; a broker that says the
			// key is gone is believed.
			return cached.key(), nil
		}
		return nil, err
	}
	b.save(wk)
	return wk, nil
}

func (c *cachedKey) key() *apiv1.WrappingKey {
	return &apiv1.WrappingKey{Name: c.Name, Version: c.Version, Suite: c.Suite, PublicKey: c.PublicKey, BrokerId: c.BrokerID}
}

func (b *BrokerKeys) load(name string) *cachedKey {
	if b.CacheDir == "" {
		return nil
	}
	data, err := os.ReadFile(b.path(name))
	if err != nil {
		return nil
	}
	var c cachedKey
	if json.Unmarshal(data, &c) != nil || c.Name != name || len(c.PublicKey) == 0 {
		return nil
	}
	return &c
}

// save is best effort: a read-only cache must not fail a build.
func (b *BrokerKeys) save(wk *apiv1.WrappingKey) {
	if b.CacheDir == "" {
		return
	}
	c := cachedKey{Fetched: b.now(), Name: wk.GetName(), Version: wk.GetVersion(), Suite: wk.GetSuite(),
		PublicKey: wk.GetPublicKey(), BrokerID: wk.GetBrokerId()}
	data, err := json.Marshal(c)
	if err != nil {
		return
	}
	p := b.path(wk.GetName())
	if os.MkdirAll(filepath.Dir(p), 0o700) == nil {
		if err := renameio.WriteFile(p, data, 0o600); err != nil {
			fmt.Fprintf(os.Stderr, "attested: warning: cannot cache key %s: %v\n", wk.GetName(), err)
		}
	}
}
