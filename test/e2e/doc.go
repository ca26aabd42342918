// Package e2e holds attested's end-to-end tests. They drive the built
// binary against swtpm over TCP (the node TPM), 'attested broker serve', a
// local registry (Debian's docker-registry) and the containers/image copy
// engine (test/imgcopy), in ocicrypt's exec and gRPC modes.
//
// The tests carry the build tag e2e:
//
//	make e2e
//	go test -tags e2e -count=1 -timeout 20m ./test/e2e/
//
// ATTESTED_BIN and IMGCOPY_BIN name prebuilt binaries; otherwise TestMain
// builds both. swtpm and docker-registry come from 'make deps'.
package e2e
