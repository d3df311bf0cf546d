package node

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"

	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/knftables"

	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/policy"
)

// startPolicy returns the NetworkPolicy controller for the node's pods
// (nil when off: no kube store, or --network-policy=false). Off, the
// table of an earlier run with it on goes: its rules would go stale and
// cut off every new pod.
func startPolicy(ctx context.Context, c Config, client kubernetes.Interface, l lease.Lease, log *slog.Logger) (*policy.Controller, error) {
	if client == nil || !c.NetworkPolicy {
		if client == nil {
			log.Info("NetworkPolicy not enforced: it needs --lease-store kube")
		} else {
			log.Warn("NetworkPolicy not enforced: --network-policy=false; policies in the cluster do nothing on this node")
		}
		if err := policy.Cleanup(ctx); err != nil {
			log.Warn("remove the NetworkPolicy table of an earlier run", "err", err)
		}
		return nil, nil
	}
	nft, err := knftables.New(knftables.InetFamily, policy.TableName)
	if err != nil {
		return nil, fmt.Errorf("NetworkPolicy needs nftables (--network-policy=false turns it off): %w", err)
	}
	return policy.New(policy.Options{Client: client, Node: c.Node, Subnets: l.Subnets(), NFT: nft,
		StateFile: filepath.Join(c.RunDir, "attachments.json"), Logger: log}), nil
}

// readiness are the checks /readyz runs, live: why the node cannot
// forward (device, routes, underlay, the backends' kernel state), why
// its store is not ready, why pods on it would fail.
func readiness(c Config, st store, fw *forwarder, pol *policy.Controller, log *slog.Logger) []func() error {
	checks := []func() error{fw.router.Check}
	if rr, ok := st.(lease.ReadyReporter); ok {
		checks = append(checks, rr.Ready)
	}
	if c.LeaseStore == "kube" {
		check := bridgeNetfilterCheck("/proc/sys/net")
		if err := check(); err != nil {
			log.Error("node not ready", "err", err)
		}
		checks = append(checks, check)
	}
	if pol != nil {
		checks = append(checks, pol.Ready)
	}
	return checks
}
