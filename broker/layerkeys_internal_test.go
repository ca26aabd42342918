package broker

import (
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/attested-dev/attested/broker/store"
)

// A kept layer key is found only by the very key version, suite, info and
// ciphertext it was opened from: no field can be shifted into another.
func TestLayerKeyIDSeparatesEveryField(t *testing.T) {
	k := store.Key{Name: "app", Version: 1, Suite: "s"}
	base := layerKeyID(k, []byte("info"), []byte("ct"))
	for name, id := range map[string][32]byte{
		"name":       layerKeyID(store.Key{Name: "app2", Version: 1, Suite: "s"}, []byte("info"), []byte("ct")),
		"version":    layerKeyID(store.Key{Name: "app", Version: 2, Suite: "s"}, []byte("info"), []byte("ct")),
		"suite":      layerKeyID(store.Key{Name: "app", Version: 1, Suite: "t"}, []byte("info"), []byte("ct")),
		"info":       layerKeyID(k, []byte("infx"), []byte("ct")),
		"ciphertext": layerKeyID(k, []byte("info"), []byte("cu")),
		"boundary":   layerKeyID(k, []byte("infoc"), []byte("t")),
	} {
		assert.NotEqual(t, base, id, name)
	}
	assert.Equal(t, base, layerKeyID(k, []byte("info"), []byte("ct")))
}
