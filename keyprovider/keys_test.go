package keyprovider_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
	"github.com/attested-dev/attested/broker/keysig"
	"github.com/attested-dev/attested/broker/suite"
	"github.com/attested-dev/attested/keyprovider"
	"github.com/attested-dev/attested/keyprovider/annotation"
)

// wrapWorld is a broker with keys "app" and "other" and a pipeline host that wraps for
// it; no TPM is involved.
type wrapWorld struct {
	b    *brokertest.Broker
	keys *keyprovider.BrokerKeys
	h    *keyprovider.Handler
	// fetcher stands between the pipeline and the broker.
	fetcher  *fetcher
	warnings []string
}

// fetcher counts the pipeline's calls to the broker and can answer in its
// place.
type fetcher struct {
	next  keyprovider.KeyFetcher
	calls int
	// answer, if set, replaces the broker's answer.
	answer func(*apiv1.WrappingKey, error) (*apiv1.WrappingKey, error)
}

func (f *fetcher) GetWrappingKey(ctx context.Context, in *apiv1.GetWrappingKeyRequest, opts ...grpc.CallOption) (*apiv1.WrappingKey, error) {
	f.calls++
	wk, err := f.next.GetWrappingKey(ctx, in, opts...)
	if f.answer != nil {
		return f.answer(wk, err)
	}
	return wk, err
}

func newWrapWorld(t *testing.T) *wrapWorld {
	t.Helper()
	ctx := context.Background()
	b := brokertest.Start(t)
	_, err := b.Admin.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: "name: any-boot\npcrs:\n  23: [\"" + fmt.Sprintf("%064d", 0) + "\"]\n"})
	require.NoError(t, err)
	for _, k := range []string{"app", "other"} {
		_, err = b.Admin.CreateKey(ctx, &apiv1.CreateKeyRequest{Name: k, Policy: "any-boot"})
		require.NoError(t, err)
	}
	w := &wrapWorld{b: b, fetcher: &fetcher{next: b.Node}}
	w.keys = &keyprovider.BrokerKeys{Broker: w.fetcher, CA: b.CA, Addr: b.Addr, CacheDir: filepath.Join(t.TempDir(), "cache"),
		Warn: func(m string) { w.warnings = append(w.warnings, m) }}
	w.h = &keyprovider.Handler{Keys: w.keys}
	return w
}

func (w *wrapWorld) wrap(t *testing.T) (annotation.Annotation, error) {
	t.Helper()
	out, err := w.h.Handle(context.Background(), []byte(wrapReq("key=app")))
	if err != nil {
		return annotation.Annotation{}, err
	}
	var r struct {
		KeyWrapResults struct {
			Annotation []byte `json:"annotation"`
		} `json:"keywrapresults"`
	}
	require.NoError(t, json.Unmarshal(out, &r))
	a, err := annotation.Parse(r.KeyWrapResults.Annotation)
	require.NoError(t, err)
	return a, nil
}

// cacheFile is where the cache keeps key name for the broker at addr; an
// attacker reads it off the source.
func cacheFile(dir, addr, name string) string {
	sum := sha256.Sum256([]byte(addr))
	return filepath.Join(dir, "keys", hex.EncodeToString(sum[:8]), name+".json")
}

// attacker is a key pair the attacker wants layer keys sealed to.
type attacker struct {
	priv, pub []byte
}

func newAttacker(t *testing.T) attacker {
	priv, pub, err := suite.Default().GenerateKey()
	require.NoError(t, err)
	return attacker{priv, pub}
}

// opens reports whether the attacker's key opens the layer key.
func (a attacker) opens(ann annotation.Annotation) bool {
	for _, r := range ann.Recipients {
		st, err := suite.Lookup(r.Suite)
		if err != nil {
			continue
		}
		if pt, err := st.Open(a.priv, annotation.Info(ann.Broker, r), r.Ciphertext); err == nil && string(pt) == optsdata {
			return true
		}
	}
	return false
}

// plant writes a cache entry as the review did: the attacker's public key
// with a fetched time that never expires.
func plant(t *testing.T, path string, entry map[string]any, mode os.FileMode) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o700))
	b, err := json.Marshal(entry)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, b, mode))
	require.NoError(t, os.Chmod(path, mode))
}

// Finding 6: a planted cache entry made keywrap seal layer keys to the
// attacker's key.
func TestPlantedCacheEntryIsNotUsed(t *testing.T) {
	w := newWrapWorld(t)
	evil := newAttacker(t)
	plant(t, cacheFile(w.keys.CacheDir, w.b.Addr, "app"), map[string]any{
		"fetched": time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC), "name": "app", "version": 1,
		"suite": suite.DefaultName, "publicKey": evil.pub, "brokerId": "broker-test",
	}, 0o600)
	ann, err := w.wrap(t)
	require.NoError(t, err, "a bad cache entry is replaced by the broker's signed key")
	assert.False(t, evil.opens(ann), "keywrap sealed the layer key to the attacker's key")
	assert.Equal(t, 1, w.fetcher.calls, "the key came from the broker")
	require.Len(t, w.warnings, 1)
	assert.Contains(t, w.warnings[0], "not used: carries no broker signature")
	// The broker's signed key replaced the planted one.
	ann, err = w.wrap(t)
	require.NoError(t, err)
	assert.False(t, evil.opens(ann))
	assert.Equal(t, 1, w.fetcher.calls, "the genuine cached key is used")
}

// evilBroker is the attacker's own broker: a CA and a signer that are not
// the pinned ones, for the same broker id.
func evilSigner(t *testing.T) *keysig.Signer {
	dir := filepath.Join(t.TempDir(), "evil")
	_, err := broker.Init(broker.InitOptions{DataDir: dir, CADir: t.TempDir(), ID: "broker-test"})
	require.NoError(t, err)
	s, err := keysig.LoadSigner(filepath.Join(dir, broker.SignerCertFile), filepath.Join(dir, broker.SignerKeyFile))
	require.NoError(t, err)
	return s
}

func entryOf(wk *apiv1.WrappingKey, fetched time.Time) map[string]any {
	return map[string]any{"fetched": fetched, "name": wk.Name, "version": wk.Version, "suite": wk.Suite,
		"publicKey": wk.PublicKey, "brokerId": wk.BrokerId, "signature": wk.Signature, "signerChain": wk.SignerChain}
}

// Finding 6: an entry signed, but by a CA other than the pinned one, is
// not used either.
func TestPlantedEntrySignedByAnotherCAIsNotUsed(t *testing.T) {
	w := newWrapWorld(t)
	evil := newAttacker(t)
	wk := &apiv1.WrappingKey{Name: "app", Version: 1, Suite: suite.DefaultName, PublicKey: evil.pub, BrokerId: "broker-test"}
	require.NoError(t, evilSigner(t).Sign(wk))
	plant(t, cacheFile(w.keys.CacheDir, w.b.Addr, "app"), entryOf(wk, time.Now()), 0o600)
	ann, err := w.wrap(t)
	require.NoError(t, err)
	assert.False(t, evil.opens(ann), "keywrap sealed the layer key to the attacker's key")
	require.Len(t, w.warnings, 1)
	assert.Contains(t, w.warnings[0], "does not chain to the pinned broker CA")

	// With the broker unreachable, the planted entry is still not used.
	plant(t, cacheFile(w.keys.CacheDir, w.b.Addr, "app"), entryOf(wk, time.Now().Add(-time.Hour)), 0o600)
	w.fetcher.answer = func(*apiv1.WrappingKey, error) (*apiv1.WrappingKey, error) {
		return nil, status.Error(codes.Unavailable, "connection refused")
	}
	_, err = w.wrap(t)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "connection refused")
	assert.Contains(t, err.Error(), "does not chain to the pinned broker CA")
}

// A genuine key cached with a fetched time in the future is stale, so a
// rotation is picked up; while the broker is unreachable it still serves.
func TestFutureFetchedTimeIsStale(t *testing.T) {
	w := newWrapWorld(t)
	_, err := w.wrap(t)
	require.NoError(t, err)
	require.Equal(t, 1, w.fetcher.calls)
	p := cacheFile(w.keys.CacheDir, w.b.Addr, "app")
	var entry map[string]any
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &entry))
	entry["fetched"] = time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC)
	plant(t, p, entry, 0o600)
	_, err = w.wrap(t)
	require.NoError(t, err)
	assert.Equal(t, 2, w.fetcher.calls, "a future fetched time must not keep an entry fresh")

	w.fetcher.answer = func(*apiv1.WrappingKey, error) (*apiv1.WrappingKey, error) {
		return nil, status.Error(codes.Unavailable, "connection refused")
	}
	entry["fetched"] = time.Now().Add(-time.Hour)
	plant(t, p, entry, 0o600)
	_, err = w.wrap(t)
	require.NoError(t, err, "a verified cached key serves while the broker is unreachable")
}

// Finding 6: keys from the wire are verified as well: unsigned, signed by
// another CA, signed by the TLS key, or another key than asked for.
func TestForgedKeyFromTheWireIsRefused(t *testing.T) {
	w := newWrapWorld(t)
	evil := newAttacker(t)
	evilSign := evilSigner(t)
	serverKey := func() (*ecdsa.PrivateKey, []byte) {
		kb, err := os.ReadFile(filepath.Join(w.b.DataDir, broker.ServerKeyFile))
		require.NoError(t, err)
		cb, err := os.ReadFile(filepath.Join(w.b.DataDir, broker.ServerCertFile))
		require.NoError(t, err)
		k, _ := pem.Decode(kb)
		c, _ := pem.Decode(cb)
		key, err := x509.ParseECPrivateKey(k.Bytes)
		require.NoError(t, err)
		return key, c.Bytes
	}
	for _, tc := range []struct {
		name  string
		forge func(wk *apiv1.WrappingKey)
		want  string
	}{
		{"unsigned", func(wk *apiv1.WrappingKey) { wk.Signature, wk.SignerChain = nil, nil }, "unsigned keys are refused"},
		{"attacker's key, broker's signature", func(wk *apiv1.WrappingKey) { wk.PublicKey = evil.pub }, "does not match"},
		{"attacker's CA", func(wk *apiv1.WrappingKey) {
			wk.PublicKey = evil.pub
			require.NoError(t, evilSign.Sign(wk))
		}, "does not chain to the pinned broker CA"},
		{"signed with the TLS key", func(wk *apiv1.WrappingKey) {
			wk.PublicKey = evil.pub
			k, cert := serverKey()
			digest := sha256.Sum256(keysig.Message(wk.BrokerId, wk.Name, wk.Version, wk.Suite, wk.PublicKey))
			sig, err := ecdsa.SignASN1(rand.Reader, k, digest[:])
			require.NoError(t, err)
			wk.Signature, wk.SignerChain = sig, [][]byte{cert}
		}, "not a wrapping-key signing certificate"},
		{"another key", func(wk *apiv1.WrappingKey) {
			other, err := w.b.Node.GetWrappingKey(context.Background(), &apiv1.GetWrappingKeyRequest{Name: "other"})
			require.NoError(t, err)
			proto.Reset(wk)
			proto.Merge(wk, other)
		}, `it is key "other", not "app"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w.fetcher.answer = func(wk *apiv1.WrappingKey, err error) (*apiv1.WrappingKey, error) {
				require.NoError(t, err)
				tc.forge(wk)
				return wk, nil
			}
			_, err := w.wrap(t)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
			assert.NoFileExists(t, cacheFile(w.keys.CacheDir, w.b.Addr, "app"), "a refused key is not cached")
		})
	}
}

// Finding 6: a cache another user owns or may write is refused, with the
// fix, rather than used or silently skipped.
func TestInsecureCacheIsRefused(t *testing.T) {
	for _, tc := range []struct {
		name  string
		spoil func(t *testing.T, cacheDir, file string)
		want  string
	}{
		{"cache dir writable by others", func(t *testing.T, dir, _ string) { require.NoError(t, os.Chmod(dir, 0o777)) }, "chmod 755"},
		{"keys dir writable by group", func(t *testing.T, dir, _ string) { require.NoError(t, os.Chmod(filepath.Join(dir, "keys"), 0o770)) }, "chmod 750"},
		{"entry writable by others", func(t *testing.T, _, f string) { require.NoError(t, os.Chmod(f, 0o666)) }, "chmod 644"},
		{"entry is a link", func(t *testing.T, _, f string) {
			elsewhere := filepath.Join(t.TempDir(), "entry.json")
			require.NoError(t, os.Rename(f, elsewhere))
			require.NoError(t, os.Symlink(elsewhere, f))
		}, "symbolic link"},
		{"entry owned by another user", func(t *testing.T, _, f string) {
			if os.Geteuid() != 0 {
				t.Skip("needs root to give a file away")
			}
			require.NoError(t, os.Chown(f, 4242, 4242))
		}, "owned by uid 4242"},
		{"cache dir owned by another user", func(t *testing.T, dir, _ string) {
			if os.Geteuid() != 0 {
				t.Skip("needs root to give a directory away")
			}
			require.NoError(t, os.Chown(dir, 4242, 4242))
		}, "owned by uid 4242"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWrapWorld(t)
			_, err := w.wrap(t)
			require.NoError(t, err)
			tc.spoil(t, w.keys.CacheDir, cacheFile(w.keys.CacheDir, w.b.Addr, "app"))
			_, err = w.wrap(t)
			require.Error(t, err)
			assert.Contains(t, err.Error(), "key cache refused")
			assert.Contains(t, err.Error(), tc.want)
			assert.Equal(t, 1, w.fetcher.calls)
		})
	}
}

func TestMissingCAIsRefused(t *testing.T) {
	w := newWrapWorld(t)
	w.keys.CA = nil
	_, err := w.wrap(t)
	require.Error(t, err)
	assert.True(t, strings.Contains(err.Error(), "no broker CA"), err.Error())
}
