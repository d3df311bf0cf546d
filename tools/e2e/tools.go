//go:build tools

// Package tools records the binaries this module builds so `go mod tidy`
// keeps them: the ginkgo CLI and agnhost (the e2e binary is ./suite).
package tools

import (
	_ "github.com/onsi/ginkgo/v2/ginkgo"
	_ "k8s.io/kubernetes/test/images/agnhost"
)
