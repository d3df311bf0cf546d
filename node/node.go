// Package node is a tulle node, assembled from its parts: the underlay it
// runs over, the backends it speaks (an encap.Table), the lease on its
// subnets (holder), the forwarder between the TUN device and the
// backends (the datapath and the router), the peering loop that programs
// both from each peer snapshot, the NetworkPolicy controller, and the
// status and metrics that ask each part for its own. Run is a node's life
// from start to stop; Cleanup removes what a node leaves.
//
// The package names no backend: it asks the table. It never parses
// flags (cmd/tulled does) and never touches a packet (tunnel and the
// backends do).
package node

import (
	"context"
	"log/slog"
	"net/netip"
	"time"

	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/internal/netconf"
)

// Config is a node's configuration, as parsed from tulled's flags and
// net-conf.
type Config struct {
	// Node is this node's name in the lease store.
	Node string
	// Net is the parsed net-conf.
	Net *netconf.Config
	// Backends are the backends the node may speak, flags parsed.
	Backends encap.Table
	// Iface, PublicIP and PublicIPv6 name the underlay (each may be
	// empty: the default route's interface, its first addresses).
	Iface                string
	PublicIP, PublicIPv6 netip.Addr

	// LeaseStore is local or kube; the rest configure it.
	LeaseStore, Kubeconfig, KubeMode, KubeNamespace, LeaseDir string
	LeaseTTL                                                  time.Duration

	// RunDir holds subnet.json and the status socket.
	RunDir string
	// TUN is the device's name; TUNGRO and TUNQueues its offloads and
	// queues; TUNAQM the bulk queues' AQM (tunnel/aqm.go).
	TUN       string
	TUNGRO    bool
	TUNQueues int
	TUNAQM    bool
	// DisableGSO and DisableGRO turn the userspace backends' UDP offloads
	// off.
	DisableGSO, DisableGRO bool
	// HTTPAddr serves /healthz, /readyz and /metrics ("" off).
	HTTPAddr string
	// NetworkPolicy enforces NetworkPolicy (with the kube store).
	NetworkPolicy bool
}

// Run runs the node until ctx ends or a part fails. The device, routes,
// lease and policy rules stay for the next start.
func Run(ctx context.Context, c Config, log *slog.Logger) error {
	u, err := findUnderlay(c)
	if err != nil {
		return err
	}
	fw := newForwarder(c, u, log)
	sp, err := startBackends(c, u, fw.peers.ByAddr, log)
	if err != nil {
		return err
	}
	defer sp.Close() // the datapath closes transports too; this covers the failures before
	client, store, err := openStore(c, log)
	if err != nil {
		return err
	}
	web, err := serveHTTP(c.HTTPAddr, log) // before the lease: a slow store keeps /readyz at "starting"
	if err != nil {
		return err
	}
	defer web.Close()
	h, err := claim(ctx, c, store, u, sp, log)
	if err != nil {
		return err
	}
	if err := fw.start(h.current(), sp); err != nil { // subnet file, TUN, datapath, router
		return err
	}
	defer fw.Close()
	pol, err := startPolicy(ctx, c, client, h.current(), log)
	if err != nil {
		return err
	}
	pe := newPeering(c, store, u, h.current(), sp, fw, log)
	st := &status{node: c.Node, holder: h, fw: fw, sp: sp, peering: pe, policy: pol, started: time.Now(),
		checks: readiness(c, store, fw, pol, log), rotate: rotation(sp, h, fw, log)}
	web.serve(st)
	sock, err := serveStatus(c.RunDir, st, log)
	if err != nil {
		return err
	}
	defer sock.Close()

	g := newGroup(ctx)
	g.Go(fw.reconcile)
	if pol != nil {
		g.Go(pol.Run)
	}
	g.Go(pe.run)
	g.Go(h.renew)
	g.Go(fw.run)
	log.Info("tulled forwarding", "tun", c.TUN, "port", c.Net.Backend.Port, "backend", c.Net.Backend.Type, "speaks", sp.names(c.Backends))
	if err := g.Wait(); err != nil {
		return err
	}
	log.Info("tulled stopped; device, routes and lease stay for the next start", "tun", c.TUN)
	return nil
}
