package policy

import (
	"encoding/hex"
	"fmt"
	"sync"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/types"
)

// Expression is a compiled CEL expression over the claims. Variables:
//
//	node          string: the node's name
//	pcrs          map(int, string): quoted SHA-256 PCR values, hex
//	tags          map(string, string): the node's tags at the broker
//	firmwareLog   bool: a firmware event log replayed
//	secureBoot    bool: Secure Boot state (PCR 7)
//	bootApps      list(string): boot application digests, hex (PCR 4)
//	kernelCmdline list(string): measured kernel command lines (PCR 8, 12)
//
// secureBoot, bootApps and kernelCmdline are bound only when the evidence
// established them. A fact the node did not prove (no firmware log, a PCR
// never extended, an event whose content its digest does not prove) is
// absent, not false or empty: an expression that reads it fails to
// evaluate and refuses, so `kernelCmdline.all(l, !l.contains("x"))` cannot
// pass on a node that sent no log. Logical operators still short-circuit:
// in `a || b`, an absent fact in b does not matter when a holds.
// kernelCmdline holds raw lines; the declarative kernelCmdline clause, not
// a substring test, is the way to match kernel parameters.
type Expression struct {
	src  string
	prog cel.Program
	// holdsWithoutClaims is true when the expression is true whatever the
	// claims (true, true || x): it requires nothing.
	holdsWithoutClaims bool
}

// celEnv is built on first use: processes that never compile a policy
// (every exec-mode keyprovider call) do not pay for it.
var celEnv = sync.OnceValues(func() (*cel.Env, error) {
	return cel.NewEnv(
		cel.Variable("node", cel.StringType),
		cel.Variable("pcrs", cel.MapType(cel.IntType, cel.StringType)),
		cel.Variable("secureBoot", cel.BoolType),
		cel.Variable("firmwareLog", cel.BoolType),
		cel.Variable("bootApps", cel.ListType(cel.StringType)),
		cel.Variable("kernelCmdline", cel.ListType(cel.StringType)),
		cel.Variable("tags", cel.MapType(cel.StringType, cel.StringType)),
	)
})

// celCostLimit bounds evaluation so a policy cannot stall the broker.
const celCostLimit = 100000

func compileExpression(src string) (*Expression, error) {
	env, err := celEnv()
	if err != nil {
		return nil, err
	}
	ast, iss := env.Compile(src)
	if iss.Err() != nil {
		return nil, iss.Err()
	}
	if ast.OutputType() != cel.BoolType {
		return nil, fmt.Errorf("must be a boolean expression, this one is %s", ast.OutputType())
	}
	prog, err := env.Program(ast, cel.CostLimit(celCostLimit))
	if err != nil {
		return nil, err
	}
	// Evaluated with every variable unknown, an expression that depends on
	// a claim stays unknown (or errs); one that comes out true holds for
	// any node.
	partial, err := env.Program(ast, cel.CostLimit(celCostLimit), cel.EvalOptions(cel.OptPartialEval))
	if err != nil {
		return nil, err
	}
	out, _, err := partial.Eval(env.UnknownVars())
	holds := err == nil && !types.IsUnknownOrError(out) && out == types.True
	return &Expression{src: src, prog: prog, holdsWithoutClaims: holds}, nil
}

func (e *Expression) eval(c Claims) (bool, string) {
	pcrs := map[int64]string{}
	for i, d := range c.PCRs {
		pcrs[int64(i)] = hex.EncodeToString(d)
	}
	tags := c.Tags
	if tags == nil {
		tags = map[string]string{}
	}
	vars := map[string]any{"node": c.Node, "pcrs": pcrs, "firmwareLog": c.Facts.FirmwareLog, "tags": tags}
	// Facts not established stay unbound (see Expression).
	if c.Facts.SecureBoot != nil {
		vars["secureBoot"] = *c.Facts.SecureBoot
	}
	if c.Facts.BootApps != nil {
		apps := []string{}
		for _, b := range c.Facts.BootApps {
			apps = append(apps, hex.EncodeToString(b.Digest))
		}
		vars["bootApps"] = apps
	}
	if c.Facts.KernelCmdlines != nil {
		vars["kernelCmdline"] = c.Facts.KernelCmdlines
	}
	out, _, err := e.prog.Eval(vars)
	if err != nil {
		return false, fmt.Sprintf("%q could not be evaluated: %v (a fact the node did not establish is absent)", e.src, err)
	}
	if ok, _ := out.Value().(bool); ok {
		return true, fmt.Sprintf("%q holds", e.src)
	}
	return false, fmt.Sprintf("%q is false", e.src)
}
