package keyprovider_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
	"github.com/attested-dev/attested/broker/suite"
	"github.com/attested-dev/attested/keyprovider"
	"github.com/attested-dev/attested/keyprovider/annotation"
)

// wrapWorld is a broker with key "app" and a pipeline host that wraps for
// it; no TPM is involved.
type wrapWorld struct {
	b    *brokertest.Broker
	keys *keyprovider.BrokerKeys
	h    *keyprovider.Handler
}

func newWrapWorld(t *testing.T) *wrapWorld {
	t.Helper()
	ctx := context.Background()
	b := brokertest.Start(t)
	_, err := b.Admin.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: "name: any-boot\npcrs:\n  23: [\"" + fmt.Sprintf("%064d", 0) + "\"]\n"})
	require.NoError(t, err)
	_, err = b.Admin.CreateKey(ctx, &apiv1.CreateKeyRequest{Name: "app", Policy: "any-boot"})
	require.NoError(t, err)
	keys := &keyprovider.BrokerKeys{Broker: b.Node, CA: b.CA, Addr: b.Addr, CacheDir: filepath.Join(t.TempDir(), "cache")}
	return &wrapWorld{b: b, keys: keys, h: &keyprovider.Handler{Keys: keys}}
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
}
