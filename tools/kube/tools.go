//go:build tools

// Package tools records the binaries this module builds (go build
// k8s.io/kubernetes/cmd/kube-apiserver) so `go mod tidy` keeps them.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
