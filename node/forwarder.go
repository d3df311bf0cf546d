package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"

	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/tunnel"
)

// forwarder is the node's datapath and what keeps it in place: the peer
// table, the TUN device, the loops between it and the backends'
// transports, and the router that owns the device's addresses, routes
// and MTU (and reconciles the backends' kernel state with its own).
type forwarder struct {
	c     Config
	u     encap.Underlay
	log   *slog.Logger
	peers *tunnel.PeerTable
	ctr   *tunnel.Counters
	// kicks asks the router for a reconcile now.
	kicks chan struct{}
	// carries: some backend moves packets itself, so the datapath's peer
	// table has peers to send to.
	carries bool
	// stopped is set when the datapath's loops ended (liveness).
	stopped atomic.Bool

	mux    *encap.Mux
	dev    tunnel.Device
	dp     *tunnel.Datapath
	router *tunnel.Router
	// routes hands the router the backends' peer routes.
	routes func([]tunnel.PeerRoute)
	sf     api.SubnetFile
}

// newForwarder returns a forwarder whose peer table is ready for the
// backends to ask (it knows no peer yet).
func newForwarder(c Config, u encap.Underlay, log *slog.Logger) *forwarder {
	return &forwarder{c: c, u: u, log: log, peers: tunnel.NewPeerTable(nil), ctr: &tunnel.Counters{}, kicks: make(chan struct{}, 1)}
}

// start writes the subnet file for the CNI plugin, opens the TUN and
// configures it for the lease's subnets, with the backends' transports
// behind the datapath and their kernel state beside the router's.
func (f *forwarder) start(l lease.Lease, sp speakers) error {
	c := f.c
	f.peers.Set(l.Subnets(), nil)
	if err := sp.attach(l.Subnets()); err != nil {
		return err
	}
	mtu, gsoMax := sp.sizes(f.u.MTU)
	if err := os.MkdirAll(c.RunDir, 0o755); err != nil {
		return fmt.Errorf("run dir: %w", err)
	}
	f.sf = api.SubnetFile{Subnet: l.Subnet, IPv6Subnet: l.IPv6Subnet, MTU: mtu}
	if c.Net.EnableIPv4 {
		f.sf.Network = c.Net.Network
	}
	if c.Net.EnableIPv6 {
		f.sf.IPv6Network = c.Net.IPv6Network
	}
	if err := api.WriteSubnetFile(c.RunDir, &f.sf); err != nil {
		return fmt.Errorf("write %s: %w", api.SubnetFileName, err)
	}
	dev, err := tunnel.OpenReopeningTUN(tunnel.TUNOptions{Name: c.TUN, MTU: mtu, Queues: c.TUNQueues, GRO: c.TUNGRO, Counters: f.ctr, Logger: f.log, OnEvent: f.kick})
	if err != nil {
		return err
	}
	f.attach(dev, sp, mtu)
	// The underlay's MTU can change under a running node: everything that
	// sizes packets follows it, the senders first.
	resize := func(underlayMTU, mtu, _ int) {
		sp.setMTU(underlayMTU)
		f.dp.SetMTU(mtu)
		dev.SetMTU(mtu)
		f.sf.MTU = mtu
		if err := api.WriteSubnetFile(c.RunDir, &f.sf); err != nil {
			f.log.Warn("rewrite subnet file with the new MTU", "err", err)
		}
		f.log.Info("underlay MTU changed; following it", "underlay", f.u.Iface, "underlay_mtu", underlayMTU, "mtu", mtu)
	}
	f.router = tunnel.NewRouter(tunnel.RouterConfig{
		Link: c.TUN, Underlay: f.u.Iface, Public: public(f.u), Size: sp.sizes, OnResize: resize,
		MTU: mtu, GSOMaxSize: gsoMax, Local: l.Subnets(), Networks: networks(c.Net), Kernel: sp.kernel(), Logger: f.log,
	})
	f.routes = f.router.SetPeerRoutes
	repaired, err := f.router.Reconcile()
	if err != nil {
		f.Close()
		return err
	}
	if len(repaired) > 0 {
		f.log.Info("configured device", "link", c.TUN, "changes", repaired)
	}
	return nil
}

// attach runs the datapath between dev and the backends' transports.
func (f *forwarder) attach(dev tunnel.Device, sp speakers, mtu int) {
	f.dev = dev
	f.mux, f.carries = sp.transport()
	f.dp = tunnel.NewDatapath(tunnel.Config{Device: dev, Transport: f.mux, Peers: f.peers, Counters: f.ctr, MTU: mtu, Logger: f.log, NoAQM: !f.c.TUNAQM})
}

// run runs the datapath until ctx ends; its ending otherwise is an error.
func (f *forwarder) run(ctx context.Context) error {
	err := f.dp.Run(ctx)
	f.stopped.Store(true)
	if err == nil && ctx.Err() == nil {
		err = errors.New("datapath stopped")
	}
	return err
}

// reconcile runs the router: the device's state, repaired on events and
// periodically, until ctx ends.
func (f *forwarder) reconcile(ctx context.Context) error {
	f.router.Run(ctx, f.kicks)
	return nil
}

// kick asks the router for a reconcile now (a device event, new peers, a
// new key).
func (f *forwarder) kick() {
	select {
	case f.kicks <- struct{}{}:
	default:
	}
}

// setPeers programs the datapath's peers (those with an endpoint) and the
// routes the backends want through the kernel.
func (f *forwarder) setPeers(local []tunnel.Peer, routes []tunnel.PeerRoute) {
	if !f.carries {
		local = nil // a backend's device carries them all
	}
	f.peers.Set(f.peers.Local(), local)
	f.routes(routes)
	f.kick()
}

// Close detaches from the device and closes the transports (the datapath
// does too when it stops); the device stays.
func (f *forwarder) Close() error {
	if f.dev != nil {
		f.dev.Close()
	}
	if f.mux != nil {
		return f.mux.Close()
	}
	return nil
}
