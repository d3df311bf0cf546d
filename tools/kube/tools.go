//go:build tools

// Package tools records the binaries this module builds (go build
// k8s.io/kubernetes/cmd/<name>) so `go mod tidy` keeps them: the API
// server for the Kubernetes store's tests, and what a real cluster on one
// machine runs (kubelet, controller-manager, scheduler, kube-proxy,
// kubectl).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
