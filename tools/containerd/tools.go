//go:build tools

// Package tools records what this module builds for the real-cluster test
// on a current runtime (internal/tstest/kubecluster.Containerd2): containerd 2 with
// its runc shim and ctr, and the CNI plugins loopback and portmap at tulle's
// own containernetworking/plugins version (Debian 12 ships containerd 1.6
// and plugins 1.1, which speak CNI up to 1.0.0). tools/setup builds them
// into ~/.cache/tulle/containerd-<version>.
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
	_ "github.com/containernetworking/plugins/plugins/main/loopback"
	_ "github.com/containernetworking/plugins/plugins/meta/portmap"
)
