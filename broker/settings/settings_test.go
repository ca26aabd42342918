package settings

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type conf struct {
	Broker  string        `yaml:"broker"`
	Timeout time.Duration `yaml:"timeout"`
	Tags    []string      `yaml:"tags"`
	Debug   bool          `yaml:"debug"`
}

func TestErrorsSpeakTheOperatorsLanguage(t *testing.T) {
	for doc, want := range map[string]string{
		"broker: x\n\nbrokr: y\n":      `unknown setting "brokr" in node.yaml line 3`,
		"timeout: 5 minutes\n":         `node.yaml line 1: "5 minutes" is not a duration such as 30s or 5m`,
		"debug: maybe\n":               `node.yaml line 1: "maybe" is not true or false`,
		"tags: one\n":                  `node.yaml line 1: "one" is not a list`,
		"broker: [unclosed\n":          "node.yaml line",
		"broker: x\n  bad indent: 1\n": "node.yaml line 2: not valid YAML",
	} {
		var c conf
		err := Decode("node.yaml", []byte(doc), &c)
		require.Error(t, err, doc)
		assert.Contains(t, err.Error(), want, doc)
		assert.NotContains(t, err.Error(), "settings.conf", "no Go type names")
		assert.NotContains(t, err.Error(), "!!str")
	}
	var c conf
	assert.ErrorIs(t, Decode("node.yaml", nil, &c), ErrEmpty)
	require.NoError(t, Decode("node.yaml", []byte("broker: b:1\ntimeout: 3s\n"), &c))
	assert.Equal(t, 3*time.Second, c.Timeout)
}
