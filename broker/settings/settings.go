// Package settings decodes YAML settings files (node.yaml, broker.yaml,
// policies) strictly, with errors an operator can act on: the file, the
// line and the setting, never Go type names.
package settings

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strings"

	"gopkg.in/yaml.v3"
)

// ErrEmpty is returned for a document with nothing in it.
var ErrEmpty = errors.New("the file is empty")

// Decode decodes data into v, refusing settings v does not have. file
// names the document in errors.
func Decode(file string, data []byte, v any) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	err := dec.Decode(v)
	if errors.Is(err, io.EOF) {
		return ErrEmpty
	}
	return Explain(file, err)
}

var (
	unknownField = regexp.MustCompile(`^line (\d+): field (\S+) not found in type \S+$`)
	wrongType    = regexp.MustCompile("^line (\\d+): cannot unmarshal !!(\\w+) `(.*)` into (\\S+)$")
	lineOnly     = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)
)

// Explain rewrites a yaml.v3 error in an operator's words.
func Explain(file string, err error) error {
	if err == nil {
		return nil
	}
	var te *yaml.TypeError
	if errors.As(err, &te) {
		msgs := make([]string, 0, len(te.Errors))
		for _, e := range te.Errors {
			msgs = append(msgs, explainLine(file, e))
		}
		return errors.New(strings.Join(msgs, "; "))
	}
	if m := lineOnly.FindStringSubmatch(err.Error()); m != nil {
		return fmt.Errorf("%s line %s: not valid YAML: %s", file, m[1], m[2])
	}
	return fmt.Errorf("%s: not valid YAML: %s", file, strings.TrimPrefix(err.Error(), "yaml: "))
}

func explainLine(file, e string) string {
	if m := unknownField.FindStringSubmatch(e); m != nil {
		return fmt.Sprintf("unknown setting %q in %s line %s", m[2], file, m[1])
	}
	if m := wrongType.FindStringSubmatch(e); m != nil {
		return fmt.Sprintf("%s line %s: %q is not %s", file, m[1], m[3], kind(m[4]))
	}
	return fmt.Sprintf("%s: %s", file, e)
}

// kind names a Go type the way a settings file's reader thinks of it.
func kind(goType string) string {
	switch {
	case goType == "time.Duration":
		return "a duration such as 30s or 5m"
	case goType == "bool":
		return "true or false"
	case strings.HasPrefix(goType, "int"), strings.HasPrefix(goType, "uint"), strings.HasPrefix(goType, "float"):
		return "a number"
	case strings.HasPrefix(goType, "[]"):
		return "a list"
	case strings.HasPrefix(goType, "map["):
		return "a mapping (key: value)"
	case goType == "string":
		return "text"
	}
	return "the expected kind of value"
}
