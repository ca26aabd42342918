package evidence

import "strings"

// Cmdline is a kernel command line split as the kernel splits it:
// lib/cmdline.c next_arg and kernel/params.c parse_args. Words are
// separated by the kernel's white space (which includes byte 0xA0); double
// quotes group white space into a word and are dropped around a word or a
// value; a word "--" ends the kernel's parameters and hands every later
// word to init as an argument.
type Cmdline struct {
	// Params are the words before "--", in order. The kernel treats those
	// it knows as parameters, later occurrences overriding earlier ones,
	// and hands the others to init (as arguments, or as environment
	// variables when they have a value).
	Params []Param
	// InitArgs are the words after "--", which init receives as arguments.
	InitArgs []Param
}

// Param is one word of a command line: a name and, after the first '=', a
// value.
type Param struct {
	Name     string
	Value    string
	HasValue bool
}

// Key is the name as the kernel compares it: '-' and '_' are the same
// character in parameter names (kernel/params.c parameq).
func (p Param) Key() string { return strings.ReplaceAll(p.Name, "-", "_") }

// String renders the word as it would appear on a command line.
func (p Param) String() string {
	if !p.HasValue {
		return p.Name
	}
	return p.Name + "=" + p.Value
}

// ParseCmdline splits a kernel command line. The kernel's line ends at
// its first NUL.
func ParseCmdline(line string) Cmdline {
	if i := strings.IndexByte(line, 0); i >= 0 {
		line = line[:i]
	}
	buf := append([]byte(line), 0)
	var c Cmdline
	dst := &c.Params
	for pos := skipSpaces(buf, 0); buf[pos] != 0; {
		var p Param
		p, pos = nextArg(buf, pos)
		if !p.HasValue && p.Name == "--" {
			// The kernel's parse stops here and the rest is parsed again
			// for init, which stops at the next "--" and drops the rest.
			if dst == &c.InitArgs {
				break
			}
			dst = &c.InitArgs
			continue
		}
		*dst = append(*dst, p)
	}
	return c
}

// isSpace is the kernel's isspace (lib/ctype.c): \t \n \v \f \r, space,
// and 0xA0 (Latin-1 no-break space).
func isSpace(c byte) bool { return c == ' ' || (c >= '\t' && c <= '\r') || c == 0xa0 }

func skipSpaces(buf []byte, i int) int {
	for isSpace(buf[i]) {
		i++
	}
	return i
}

// nextArg is the kernel's next_arg, step for step, on a NUL-terminated
// buffer it edits as the kernel does; it returns the word and the index of
// the next one.
func nextArg(buf []byte, args int) (Param, int) {
	inQuote, quoted := false, false
	if buf[args] == '"' {
		args++
		inQuote, quoted = true, true
	}
	i, equals := 0, 0
	for ; buf[args+i] != 0; i++ {
		c := buf[args+i]
		if isSpace(c) && !inQuote {
			break
		}
		if equals == 0 && c == '=' {
			equals = i
		}
		if c == '"' {
			inQuote = !inQuote
		}
	}
	val := -1
	if equals != 0 {
		buf[args+equals] = 0
		val = args + equals + 1
		// Don't include quotes in value.
		if buf[val] == '"' {
			val++
			if buf[args+i-1] == '"' {
				buf[args+i-1] = 0
			}
		}
	}
	if quoted && i > 0 && buf[args+i-1] == '"' {
		buf[args+i-1] = 0
	}
	next := args + i
	if buf[next] != 0 {
		buf[next] = 0
		next++
	}
	p := Param{Name: cString(buf, args)}
	if val >= 0 {
		p.Value, p.HasValue = cString(buf, val), true
	}
	return p, skipSpaces(buf, next)
}

func cString(buf []byte, i int) string {
	n := i
	for buf[n] != 0 {
		n++
	}
	return string(buf[i:n])
}
