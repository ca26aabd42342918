package policy

import (
	"encoding/hex"
	"fmt"
	"sync"

	"github.com/google/cel-go/cel"
)

// Expression is a compiled CEL expression over the claims. Variables:
// node (string), pcrs (map int -> hex string), secureBoot (bool; false when
// unknown), firmwareLog (bool), bootApps (list of hex), kernelCmdline
// (list of string), tags (map string -> string).
type Expression struct {
	src  string
	prog cel.Program
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
	return &Expression{src: src, prog: prog}, nil
}

func (e *Expression) eval(c Claims) (bool, string) {
	pcrs := map[int64]string{}
	for i, d := range c.PCRs {
		pcrs[int64(i)] = hex.EncodeToString(d)
	}
	apps := []string{}
	for _, b := range c.Facts.BootApps {
		apps = append(apps, hex.EncodeToString(b.Digest))
	}
	tags := c.Tags
	if tags == nil {
		tags = map[string]string{}
	}
	cmdlines := c.Facts.KernelCmdlines
	if cmdlines == nil {
		cmdlines = []string{}
	}
	out, _, err := e.prog.Eval(map[string]any{
		"node": c.Node, "pcrs": pcrs, "secureBoot": c.Facts.SecureBoot != nil && *c.Facts.SecureBoot,
		"firmwareLog": c.Facts.FirmwareLog, "bootApps": apps, "kernelCmdline": cmdlines, "tags": tags,
	})
	if err != nil {
		return false, fmt.Sprintf("%q could not be evaluated: %v", e.src, err)
	}
	if ok, _ := out.Value().(bool); ok {
		return true, fmt.Sprintf("%q holds", e.src)
	}
	return false, fmt.Sprintf("%q is false", e.src)
}
