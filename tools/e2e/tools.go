//go:build tools

// Package tools records the binaries this module builds so `go mod tidy`
// keeps them: the ginkgo CLI and agnhost (CoreDNS is ./coredns, the e2e
// binary ./suite).
package tools

import (
	_ "github.com/onsi/ginkgo/v2/ginkgo"
	_ "k8s.io/kubernetes/test/images/agnhost"
)
