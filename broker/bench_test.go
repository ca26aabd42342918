package broker_test

import (
	"context"
	"testing"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// BenchmarkUnwrapThroughput drives the broker's release path (session
// lookup, policy, HPKE open and re-seal, audit commit) from parallel
// clients over TLS on loopback; ns/op inverted is releases per second.
func BenchmarkUnwrapThroughput(b *testing.B) {
	t := &testing.T{}
	br, n, _, ann := setup(t)
	s, err := n.session(t)
	if err != nil {
		b.Fatal(err)
	}
	req := &apiv1.UnwrapRequest{SessionToken: s.Token, Annotation: ann}
	b.SetParallelism(8)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := br.Node.Unwrap(context.Background(), req); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "unwraps/s")
}
