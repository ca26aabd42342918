//go:build tools

// Package kubeapiserver builds a real Kubernetes API server and etcd for
// the labeler's tests (make kube-apiserver): kube-apiserver from
// k8s.io/kubernetes, whose go.mod replaces its staging modules (hence this
// module of its own, with the same replaces pointing at their releases),
// and an embedded single-member etcd (./etcd).
package kubeapiserver

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
