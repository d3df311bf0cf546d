package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/knftables"

	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/encap/udp"
	"github.com/tulle-net/tulle/encap/vxlan"
	"github.com/tulle-net/tulle/encap/wireguard"
	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/lease/kube"
	"github.com/tulle-net/tulle/lease/local"
	"github.com/tulle-net/tulle/policy"
	"github.com/tulle-net/tulle/tunnel"
)

// underlay is where this node's datagrams leave from.
type underlay struct {
	iface      string
	mtu        int
	ip4, ip6   netip.Addr
	primaryIs6 bool
	// onLink are the prefixes directly connected on the interface: a peer
	// inside one shares its L2 segment.
	onLink []netip.Prefix
	// vxlan: the node speaks VXLAN (kernel or userspace), whose inner MTU
	// is the smallest.
	vxlan bool
	// wireguard: the node speaks WireGuard only.
	wireguard bool
}

// findUnderlay resolves --iface/--public-ip/--public-ipv6 against the
// system. Every failure is a configuration error.
func findUnderlay(o *options) (*underlay, error) {
	u := &underlay{ip4: o.pub, ip6: o.pb6}
	var link netlink.Link
	var err error
	switch {
	case o.iface != "":
		if link, err = netlink.LinkByName(o.iface); err != nil {
			return nil, badConfig("flag --iface: no interface %q", o.iface)
		}
	case o.pub.IsValid() || o.pb6.IsValid():
		want := o.pub
		if !want.IsValid() {
			want = o.pb6
		}
		if link, err = linkWithAddr(want); err != nil {
			return nil, err
		}
	default:
		if link, err = defaultRouteLink(); err != nil {
			return nil, err
		}
	}
	u.iface, u.mtu = link.Attrs().Name, link.Attrs().MTU
	addrs, err := netlink.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("addresses of %s: %w", u.iface, err)
	}
	have := func(a netip.Addr) bool {
		return slices.ContainsFunc(addrs, func(x netlink.Addr) bool { ip, _ := netip.AddrFromSlice(x.IP); return ip.Unmap() == a })
	}
	if u.ip4.IsValid() && !have(u.ip4) {
		return nil, badConfig("flag --public-ip: %s is not an address of %s", u.ip4, u.iface)
	}
	if u.ip6.IsValid() && !have(u.ip6) {
		return nil, badConfig("flag --public-ipv6: %s is not an address of %s", u.ip6, u.iface)
	}
	if !u.ip4.IsValid() && !u.ip6.IsValid() {
		for _, a := range addrs {
			ip, _ := netip.AddrFromSlice(a.IP)
			ip = ip.Unmap()
			if ip.Is4() && ip.IsGlobalUnicast() && !u.ip4.IsValid() {
				u.ip4 = ip
			}
		}
		if !u.ip4.IsValid() {
			for _, a := range addrs {
				ip, _ := netip.AddrFromSlice(a.IP)
				if ip.Is6() && !ip.Is4In6() && ip.IsGlobalUnicast() && !u.ip6.IsValid() {
					u.ip6 = ip
				}
			}
		}
		if !u.ip4.IsValid() && !u.ip6.IsValid() {
			return nil, badConfig("flag --iface: %s has no usable address", u.iface)
		}
	}
	u.primaryIs6 = !u.ip4.IsValid()
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && a.IPNet != nil {
			ones, _ := a.Mask.Size()
			if p := netip.PrefixFrom(ip.Unmap(), ones).Masked(); ip.IsGlobalUnicast() && ones > 0 {
				u.onLink = append(u.onLink, p)
			}
		}
	}
	if udp.InnerMTU(u.mtu, u.primaryIs6) < 1280 && o.net.EnableIPv6 {
		return nil, badConfig("interface %s: MTU %d leaves less than IPv6's minimum 1280 inside the overlay", u.iface, u.mtu)
	}
	return u, nil
}

func linkWithAddr(a netip.Addr) (netlink.Link, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	for _, l := range links {
		addrs, _ := netlink.AddrList(l, netlink.FAMILY_ALL)
		for _, x := range addrs {
			if ip, _ := netip.AddrFromSlice(x.IP); ip.Unmap() == a {
				return l, nil
			}
		}
	}
	return nil, badConfig("public address %s is on no interface of this host", a)
}

func defaultRouteLink() (netlink.Link, error) {
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Dst: nil}, 0)
		if err != nil {
			continue
		}
		for _, r := range routes {
			if r.Dst == nil || r.Dst.IP.IsUnspecified() {
				if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
					return l, nil
				}
			}
		}
	}
	return nil, badConfig("no default route: name the underlay with --iface or --public-ip")
}

// store is what tulled needs of a lease store.
type store interface {
	lease.Store
	lease.Lookuper
}

func openStore(o *options, client kubernetes.Interface, log *slog.Logger) (store, error) {
	if o.leaseStore == "local" {
		return local.New(local.Options{Dir: o.leaseDir, Net: o.net, TTL: o.leaseTTL, Logger: log})
	}
	return kube.New(kube.Options{Client: client, Net: o.net, Mode: kube.Mode(o.kubeMode), Namespace: o.kubeNS, TTL: o.leaseTTL, Logger: log})
}

// kubeClient returns the Kubernetes client of --lease-store kube (nil with
// the local store).
func kubeClient(o *options) (kubernetes.Interface, error) {
	if o.leaseStore != "kube" {
		return nil, nil
	}
	var cfg *rest.Config
	var err error
	if o.kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", o.kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, badConfig("kubernetes client config (--kubeconfig, or in-cluster): %v", err)
	}
	cfg.UserAgent = "tulled"
	// Protobuf: Nodes and Pods are a fraction of their JSON size to
	// transfer and decode.
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, badConfig("kubernetes client: %v", err)
	}
	return client, nil
}

func networks(c *netconf.Config) []netip.Prefix {
	var n []netip.Prefix
	if c.EnableIPv4 {
		n = append(n, c.Network)
	}
	if c.EnableIPv6 {
		n = append(n, c.IPv6Network)
	}
	return n
}

func run(o *options, log *slog.Logger) error {
	u, err := findUnderlay(o)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	wgMode := o.net.Backend.Type == netconf.BackendWireGuard
	var caps encap.Caps
	var uvx *vxlan.Userspace
	vxCtr, wgCtr := &vxlan.Counters{}, &wireguard.Counters{}
	var wgNode *wg
	vtep := u.ip4
	if !vtep.IsValid() {
		vtep = u.ip6
	}
	if wgMode {
		var err error
		if wgNode, err = startWireGuard(o, u, wgCtr, log); err != nil {
			return err
		}
		defer wgNode.Close() // the datapath closes a transport too; this covers the failures before
		caps.WireGuard = &encap.WireGuardCaps{Port: o.net.Backend.Port, PublicKey: wgNode.PublicKey().String()}
	} else {
		// Every node speaks the userspace udp backend and host-gw (plain
		// routes need nothing but the kernel), and VXLAN: through the kernel
		// where a probe shows the kernel has it (and --kernel-vxlan allows),
		// else from the datapath. It publishes them all, and udp alone for
		// tulleds from before capabilities.
		caps = encap.Caps{UDP: &encap.UDPCaps{Port: o.net.Backend.Port}, HostGW: &encap.HostGWCaps{}}
		if t := o.net.Backend.Type; t == netconf.BackendAuto || t == netconf.BackendVXLAN {
			caps.VXLAN = &encap.VXLANCaps{VNI: o.net.Backend.VNI, Port: int(o.net.Backend.VXLANPort), MAC: vxlan.MACFor(o.node).String()}
			perr := errors.New("turned off by --kernel-vxlan=false")
			if o.kernelVXLAN {
				perr = vxlan.Probe()
			}
			if perr != nil {
				caps.VXLAN.Userspace = true
				if gone, err := vxlan.RemoveFormer(vxlan.DeviceName, caps.VXLAN.Port); err != nil {
					log.Warn("remove the kernel VXLAN device of an earlier run", "device", vxlan.DeviceName, "err", err)
				} else if gone {
					log.Info("removed the kernel VXLAN device of an earlier run: VXLAN is in userspace now", "device", vxlan.DeviceName)
				}
				uvx, err = vxlan.NewUserspace(vxlan.UserspaceConfig{VNI: caps.VXLAN.VNI, Port: caps.VXLAN.Port, MAC: vxlan.MACFor(o.node), Local4: u.ip4, Local6: u.ip6,
					MTU: u.mtu, DisableGSO: !o.udpGSO, DisableGRO: !o.udpGRO, Counters: vxCtr, Logger: log})
				switch {
				case err != nil && t == netconf.BackendVXLAN:
					return badConfig("net-conf field Backend.Type: vxlan: no kernel VXLAN (%v), and VXLAN in userspace cannot start: %v", perr, err)
				case err != nil:
					log.Warn("no VXLAN: no kernel VXLAN, and VXLAN in userspace cannot start; peers are reached over host-gw or udp", "kernel", perr, "err", err)
					caps.VXLAN = nil
				default:
					defer uvx.Close() // the datapath closes it too; this covers the failures before
					log.Info("VXLAN in userspace", "why", perr)
				}
			}
		}
	}
	// Health and metrics before the lease (a store that is slow to answer
	// keeps /readyz at "starting"), once the configuration is known good.
	client, err := kubeClient(o)
	if err != nil {
		return err
	}
	store, err := openStore(o, client, log)
	if err != nil {
		return err
	}
	hl := &health{}
	if o.httpAddr != "" {
		hsrv, err := serveHTTP(o.httpAddr, hl, log)
		if err != nil {
			return err
		}
		defer hsrv.Close()
	}
	local := encap.Local{Mode: o.net.Backend.Type, Caps: caps, IP4: u.ip4, IP6: u.ip6, OnLink: u.onLink}
	legacy := netconf.BackendUDP
	if wgMode {
		legacy = netconf.BackendWireGuard
	}
	attrs := lease.Attrs{PublicIP: u.ip4, PublicIPv6: u.ip6, Backend: lease.Backend{Type: legacy, Port: o.net.Backend.Port}, Backends: caps.Publish()}
	l, err := store.Claim(ctx, o.node, attrs)
	if errors.Is(err, lease.ErrInUse) {
		return badConfig("flag --node-name: %v", err)
	}
	if err != nil {
		return fmt.Errorf("claim lease: %w", err)
	}
	// The TUN and pods get the smallest inner MTU of the paths this node
	// may use, so their packets fit whichever backend serves a peer.
	u.vxlan, u.wireguard = caps.VXLAN != nil, wgMode
	mtu, gsoMax := u.sizes(u.mtu)
	podMTU := func(underlayMTU int) int { m, _ := u.sizes(underlayMTU); return m }
	log.Info("lease held", "subnet", l.Subnet, "ipv6Subnet", l.IPv6Subnet, "underlay", u.iface, "public_ip", u.ip4, "public_ipv6", u.ip6, "mtu", mtu)

	if err := os.MkdirAll(o.runDir, 0o755); err != nil {
		return fmt.Errorf("run dir: %w", err)
	}
	sf := api.SubnetFile{Subnet: l.Subnet, IPv6Subnet: l.IPv6Subnet, MTU: podMTU(u.mtu)}
	if o.net.EnableIPv4 {
		sf.Network = o.net.Network
	}
	if o.net.EnableIPv6 {
		sf.IPv6Network = o.net.IPv6Network
	}
	if err := api.WriteSubnetFile(o.runDir, &sf); err != nil {
		return fmt.Errorf("write %s: %w", api.SubnetFileName, err)
	}

	ctr, udpCtr := &tunnel.Counters{}, &udp.Counters{}
	kick := make(chan struct{}, 1)
	kickRouter := func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	peers := tunnel.NewPeerTable(l.Subnets())
	var tr *encap.Mux
	switch {
	case wgMode && wgNode.dev != nil:
		tr = encap.NewMux(noTransport{})
	case wgMode:
		tr = encap.NewMux(wgNode.transport)
	default:
		uopt := udp.Options{
			MTU: u.mtu, Accept: func(a netip.AddrPort) bool { return peers.ByAddr(a) != nil },
			DisableGSO: !o.udpGSO, DisableGRO: !o.udpGRO, Counters: udpCtr, Logger: log,
		}
		if u.ip4.IsValid() {
			uopt.Local4 = netip.AddrPortFrom(u.ip4, o.net.Backend.Port)
		}
		if u.ip6.IsValid() {
			uopt.Local6 = netip.AddrPortFrom(u.ip6, o.net.Backend.Port)
		}
		udpTr, err := udp.New(uopt)
		if err != nil {
			return err
		}
		tr = encap.NewMux(udpTr)
		if uvx != nil {
			tr = encap.NewMux(udpTr, uvx)
		}
	}
	dev, err := tunnel.OpenReopeningTUN(tunnel.TUNOptions{Name: o.tunName, MTU: mtu, Queues: o.tunQueues, GRO: o.gro, Counters: ctr, Logger: log, OnEvent: kickRouter})
	if err != nil {
		tr.Close()
		return err
	}
	dp := tunnel.NewDatapath(tunnel.Config{Device: dev, Transport: tr, Peers: peers, Counters: ctr, MTU: mtu, Logger: log})

	// The underlay's MTU can change under a running node: everything that
	// sizes packets follows it, the senders first.
	var vx *vxlan.Kernel
	var kernel []tunnel.KernelPath
	if caps.VXLAN != nil && !caps.VXLAN.Userspace {
		vx = vxlan.New(vxlan.Config{VNI: caps.VXLAN.VNI, Port: caps.VXLAN.Port, Underlay: u.iface, VTEP: vtep, MAC: vxlan.MACFor(o.node),
			MTU: u.mtu - vxlan.Overhead(u.primaryIs6), Local: l.Subnets(), Networks: networks(o.net)})
		kernel = append(kernel, vx)
	}
	if wgMode && wgNode.dev != nil {
		wgNode.dev.SetLocal(l.Subnets())
		kernel = append(kernel, wgNode.dev)
	}
	resize := func(underlayMTU, mtu, _ int) {
		tr.SetMTU(underlayMTU)
		dp.SetMTU(mtu)
		dev.SetMTU(mtu)
		if vx != nil {
			vx.SetMTU(underlayMTU - vxlan.Overhead(u.primaryIs6))
		}
		if wgMode && wgNode.dev != nil {
			wgNode.dev.SetMTU(mtu)
		}
		sf.MTU = podMTU(underlayMTU)
		if err := api.WriteSubnetFile(o.runDir, &sf); err != nil {
			log.Warn("rewrite subnet file with the new MTU", "err", err)
		}
		log.Info("underlay MTU changed; following it", "underlay", u.iface, "underlay_mtu", underlayMTU, "mtu", mtu)
	}
	router := tunnel.NewRouter(tunnel.RouterConfig{
		Link: o.tunName, Underlay: u.iface, Public: u.public(), Size: u.sizes, OnResize: resize,
		MTU: mtu, GSOMaxSize: gsoMax, Local: l.Subnets(), Networks: networks(o.net), Kernel: kernel, Logger: log,
	})
	if repaired, err := router.Reconcile(); err != nil {
		dev.Close()
		tr.Close()
		return err
	} else if len(repaired) > 0 {
		log.Info("configured device", "link", o.tunName, "changes", repaired)
	}

	st := &status{node: o.node, lease: l, ctr: ctr, udpCtr: udpCtr, vxCtr: vxCtr, wgCtr: wgCtr, wg: wgNode, wgPort: o.net.Backend.Port, peers: peers, mtu: router.MTU, started: time.Now(), checks: []func() error{router.Check}}
	if rr, ok := store.(lease.ReadyReporter); ok {
		st.checks = append(st.checks, rr.Ready)
	}
	if o.leaseStore == "kube" {
		check := bridgeNetfilterCheck("/proc/sys/net")
		if err := check(); err != nil {
			log.Error("node not ready", "err", err)
		}
		st.checks = append(st.checks, check)
	}
	var pol *policy.Controller
	switch {
	case client == nil || !o.networkPolicy:
		if client == nil {
			log.Info("NetworkPolicy not enforced: it needs --lease-store kube")
		} else {
			log.Warn("NetworkPolicy not enforced: --network-policy=false; policies in the cluster do nothing on this node")
		}
		// Rules of an earlier run with it on would go stale (and cut off
		// every new pod): they go.
		if err := policy.Cleanup(ctx); err != nil {
			log.Warn("remove the NetworkPolicy table of an earlier run", "err", err)
		}
	default:
		nft, err := knftables.New(knftables.InetFamily, policy.TableName)
		if err != nil {
			dev.Close()
			tr.Close()
			return fmt.Errorf("NetworkPolicy needs nftables (--network-policy=false turns it off): %w", err)
		}
		pol = policy.New(policy.Options{Client: client, Node: o.node, Subnets: l.Subnets(), NFT: nft,
			StateFile: filepath.Join(o.runDir, "attachments.json"), Logger: log})
		st.policy = pol
		st.checks = append(st.checks, pol.Ready)
	}
	hl.st.Store(st)
	srv, err := serveStatus(filepath.Join(o.runDir, api.SocketName), st, log)
	if err != nil {
		dev.Close()
		tr.Close()
		return err
	}
	defer srv.Close()

	var wg sync.WaitGroup
	var rotMu sync.Mutex
	runCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	wg.Go(func() { router.Run(runCtx, kick) })
	if pol != nil {
		wg.Go(func() { cancel(pol.Run(runCtx)) })
	}
	wg.Go(func() {
		cancel(watchPeers(runCtx, store, o.node, local, l, peers, router, programmed{vx, uvx, wgNode}, kickRouter, st, log))
	})
	republish := make(chan lease.Attrs, 1)
	if wgMode {
		st.rotate = func(now bool) (wireguard.Key, time.Duration, error) {
			rotMu.Lock()
			defer rotMu.Unlock()
			k, grace, err := wgNode.rotate(o.wgKey, now)
			if err != nil {
				return k, 0, err
			}
			kickRouter() // a device takes its new key on the next reconcile
			c := *caps.WireGuard
			c.PublicKey = k.Public().String()
			a := attrs
			a.Backends = encap.Caps{WireGuard: &c}.Publish()
			select {
			case <-republish: // a newer key replaces one not yet published
			default:
			}
			republish <- a
			log.Info("rotated the WireGuard key; publishing it", "public_key", k.Public(), "old_key_grace", grace)
			return k, grace, nil
		}
	}
	wg.Go(func() { cancel(renew(runCtx, store, l, o.leaseTTL, republish, st, log)) })
	wg.Go(func() {
		err := dp.Run(runCtx)
		st.stopped.Store(true)
		if err == nil && runCtx.Err() == nil {
			err = errors.New("datapath stopped")
		}
		cancel(err)
	})
	log.Info("tulled forwarding", "tun", o.tunName, "port", o.net.Backend.Port, "backend", o.net.Backend.Type, "speaks", caps.Names())
	<-runCtx.Done()
	cancel(nil)
	wg.Wait()
	if err := context.Cause(runCtx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	log.Info("tulled stopped; device, routes and lease stay for the next start", "tun", o.tunName)
	return nil
}

// public returns the underlay addresses peers send to.
func (u *underlay) public() []netip.Addr {
	var a []netip.Addr
	for _, ip := range []netip.Addr{u.ip4, u.ip6} {
		if ip.IsValid() {
			a = append(a, ip)
		}
	}
	return a
}

// sizes returns the TUN MTU and GSO cap for an underlay MTU: the smallest
// inner MTU of the paths this node speaks.
func (u *underlay) sizes(underlayMTU int) (mtu, gsoMax int) {
	if u.wireguard {
		// Super-packets are cut into messages whatever their size.
		return wireguard.InnerMTU(underlayMTU, u.primaryIs6), tunnel.MaxPacket
	}
	mtu = udp.InnerMTU(underlayMTU, u.primaryIs6)
	if u.vxlan {
		mtu = min(mtu, underlayMTU-vxlan.Overhead(u.primaryIs6))
	}
	return mtu, udp.MaxFrame(underlayMTU, u.primaryIs6)
}

// renew extends the lease every lease.RenewInterval, and at once with new
// attributes from republish (a rotated key). A failed renewal is retried
// with backoff (1 s doubling, at most a quarter of the interval), so a
// store that comes back in time never sees the lease expire. Losing the
// lease is fatal: the subnet's pods are now someone else's addresses.
func renew(ctx context.Context, store lease.Store, l lease.Lease, ttl time.Duration, republish <-chan lease.Attrs, st *status, log *slog.Logger) error {
	interval := lease.RenewInterval(ttl)
	wait, backoff := interval, time.Duration(0)
	for {
		select {
		case <-ctx.Done():
			return nil
		case a := <-republish:
			l.Attrs = a
		case <-time.After(wait):
		}
		nl, err := store.Renew(ctx, l)
		if errors.Is(err, lease.ErrLost) {
			return fmt.Errorf("lease %s: %w", l.Key(), err)
		}
		if err != nil {
			backoff = min(max(2*backoff, time.Second), interval/4)
			st.renewErr.Add(1)
			log.Warn("renew lease; retrying", "subnet", l.Key(), "in", backoff, "expires", l.Expiration, "err", err)
			wait = backoff
			continue
		}
		if backoff > 0 {
			log.Info("lease renewed again", "subnet", l.Key())
		}
		l, wait, backoff = nl, interval, 0
		st.renewOK.Add(1)
		st.setLease(l)
	}
}

// watchPeers chooses a backend for every peer of every snapshot and
// applies the result: udp endpoints to the peer table, kernel-path routes
// to the router, the choices to the status.
// programmed are the backends that learn their peers from the plan; any
// may be nil.
type programmed struct {
	vx  *vxlan.Kernel
	uvx *vxlan.Userspace
	wg  *wg
}

func watchPeers(ctx context.Context, store lease.Store, self string, local encap.Local, l lease.Lease, peers *tunnel.PeerTable, router *tunnel.Router, be programmed, kick func(), st *status, log *slog.Logger) error {
	ch, err := store.WatchPeers(ctx, self)
	if err != nil {
		return fmt.Errorf("watch peers: %w", err)
	}
	known := map[string]string{} // peer → what was logged of its choice
	for {
		var snap []lease.Peer
		select {
		case <-ctx.Done():
			return nil
		case snap = <-ch:
		}
		plan := encap.Plan(local, snap)
		seen := map[string]bool{}
		view := make([]api.Peer, 0, len(plan))
		for _, a := range plan {
			seen[a.Peer.Node] = true
			view = append(view, api.Peer{Name: a.Peer.Node, Endpoint: a.Endpoint, Subnets: a.Peer.Subnets(), Backend: a.Backend, Userspace: a.Userspace, Reason: a.Reason})
			said := a.Backend + "|" + a.Reason + "|" + a.Endpoint.String() + "|" + fmt.Sprint(a.Peer.Subnets())
			if known[a.Peer.Node] == said {
				continue
			}
			known[a.Peer.Node] = said
			if a.Backend == "" {
				log.Warn("peer unreachable", "peer", a.Peer.Node, "reason", a.Reason)
			} else {
				log.Info("peer up", "peer", a.Peer.Node, "backend", a.Backend, "reason", a.Reason, "endpoint", a.Endpoint, "subnets", a.Peer.Subnets())
			}
		}
		for n := range known {
			if !seen[n] {
				log.Info("peer gone", "peer", n)
				delete(known, n)
			}
		}
		pr := encap.Translate(l.Subnets(), plan)
		// The transport learns its peers before the table sends it their
		// frames.
		if be.uvx != nil {
			be.uvx.SetPeers(pr.UserVXLAN)
		}
		if be.wg != nil {
			be.wg.SetPeers(pr.WireGuard)
			if be.wg.dev != nil {
				pr.Userspace = nil // the device carries them all
			}
		}
		peers.Set(l.Subnets(), pr.Userspace)
		router.SetPeerRoutes(pr.Routes)
		if be.vx != nil {
			be.vx.SetPeers(pr.VXLAN)
		}
		kick()
		st.setPeers(view)
		st.snapshots.Add(1)
	}
}

// cleanup removes what tulled added: routes, device, lease, run files.
// Everything already gone counts as removed.
func cleanup(o *options, log *slog.Logger) error {
	var errs []error
	if err := tunnel.Cleanup(o.tunName, networks(o.net)); err != nil {
		errs = append(errs, err)
	}
	if err := vxlan.Cleanup(vxlan.DeviceName); err != nil {
		errs = append(errs, err)
	}
	if err := wireguard.CleanupDevice(o.wgDevice); err != nil {
		errs = append(errs, err)
	}
	if err := policy.Cleanup(context.Background()); err != nil {
		errs = append(errs, err)
	}
	client, err := kubeClient(o)
	var store store
	if err == nil {
		store, err = openStore(o, client, log)
	}
	if err == nil {
		if l, ok, err := store.Lookup(context.Background(), o.node); err != nil {
			errs = append(errs, err)
		} else if ok {
			errs = append(errs, store.Release(context.Background(), l))
		}
	} else {
		errs = append(errs, err)
	}
	for _, f := range []string{api.SubnetFileName, api.SocketName} {
		if err := os.Remove(filepath.Join(o.runDir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	log.Info("cleaned up", "tun", o.tunName)
	return nil
}
