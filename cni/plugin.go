package cni

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ip"
	"github.com/containernetworking/plugins/pkg/ipam"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/tulle-net/tulle/internal/api"
)

// readLease reads tulled's subnet.json; no lease yet is "try again later".
func readLease(c *NetConf) (*api.SubnetFile, error) {
	sub, err := api.ReadSubnetFile(c.RunDir)
	if errors.Is(err, api.ErrNoLease) {
		return nil, types.NewError(types.ErrTryAgainLater, "tulled holds no lease yet (is tulled running?)", err.Error())
	}
	if err != nil {
		return nil, types.NewError(types.ErrInternal, "cannot read tulled's lease", err.Error())
	}
	return sub, nil
}

func subnets(sub *api.SubnetFile) []netip.Prefix {
	var p []netip.Prefix
	for _, s := range []netip.Prefix{sub.Subnet, sub.IPv6Subnet} {
		if s.IsValid() {
			p = append(p, s.Masked())
		}
	}
	return p
}

// existingIPAM opens the network's IPAM store if it exists (DEL, CHECK and
// GC need no subnets; a missing store means nothing was ever allocated).
func existingIPAM(c *NetConf) (*addrPool, bool, error) {
	if _, err := os.Stat(filepath.Join(c.DataDir, c.Name)); err != nil {
		return nil, false, nil
	}
	m, err := openIPAM(c, &api.SubnetFile{})
	if err != nil {
		return nil, false, err
	}
	return m, true, nil
}

// Add attaches the pod: IPAM, bridge, veth, addresses and routes in the pod,
// masquerade. On failure it undoes what this call did, and only that; the
// returned error names anything the undo could not remove.
//
// A repeated ADD of a live attachment (a runtime retrying) returns the
// attachment as it is when it is intact, and otherwise fails without
// touching it: its addresses belong to a running pod.
func Add(args *skel.CmdArgs) (result types.Result, err error) {
	c, err := LoadConf(args.StdinData)
	if err != nil {
		return nil, err
	}
	if err := c.checkMasqTools(); err != nil {
		return nil, err
	}
	sub, err := readLease(c)
	if err != nil {
		return nil, err
	}
	netns, err := ns.GetNS(args.Netns)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidNetNS, "cannot open the pod's network namespace", fmt.Sprintf("%s: %v", args.Netns, err))
	}
	defer netns.Close()
	mtu := sub.MTU
	if c.MTU != 0 {
		mtu = c.MTU
	}

	m, err := openIPAM(c, sub)
	if err != nil {
		return nil, types.NewError(types.ErrIOFailure, "ipam", err.Error())
	}
	defer m.close()
	if m.has(args.ContainerID, args.IfName) {
		res, err := liveResult(c, args, netns, m.held(args.ContainerID, args.IfName))
		if err != nil {
			return nil, types.NewError(types.ErrInternal, "attachment already exists but is not intact; DEL it before adding it again",
				fmt.Sprintf("container %s interface %s: %v", args.ContainerID, args.IfName, err))
		}
		if c.ipMasq() {
			if err := ensureMasq(c.Name, sub); err != nil {
				return nil, types.NewError(types.ErrInternal, "masquerade", err.Error())
			}
		}
		if err := attachPolicy(c, args, res); err != nil {
			return nil, err
		}
		return res.GetAsVersion(c.CNIVersion)
	}

	ips, err := m.allocate(args.ContainerID, args.IfName)
	if errors.Is(err, errExhausted) {
		return nil, types.NewError(ErrSubnetExhausted, "node subnet exhausted", err.Error())
	}
	if err != nil {
		return nil, types.NewError(types.ErrInternal, "ipam", err.Error())
	}
	hostName := hostVethName(args.ContainerID, args.IfName)
	createdVeth := false
	defer func() {
		if err == nil {
			return
		}
		var undo []error
		if createdVeth {
			undo = append(undo, delLink(hostName)) // takes the pod side with it
		}
		undo = append(undo, m.releaseIPs(args.ContainerID, args.IfName, ips))
		if uerr := errors.Join(undo...); uerr != nil {
			err = withDetails(err, "undo failed, left behind: "+uerr.Error())
		}
	}()

	br, err := ensureBridge(c.Bridge, mtu, subnets(sub))
	if err != nil {
		return nil, types.NewError(types.ErrInternal, "node bridge", err.Error())
	}
	if sub.Subnet.IsValid() {
		if err := ip.EnableIP4Forward(); err != nil {
			return nil, types.NewError(types.ErrInternal, "enable IPv4 forwarding", err.Error())
		}
	}
	if sub.IPv6Subnet.IsValid() {
		if err := ip.EnableIP6Forward(); err != nil {
			return nil, types.NewError(types.ErrInternal, "enable IPv6 forwarding", err.Error())
		}
	}
	if _, lerr := netlink.LinkByName(hostName); lerr == nil {
		return nil, types.NewError(types.ErrInternal, "host veth already exists without an allocation (a leftover: DEL or GC removes it)", hostName)
	}
	createdVeth = true
	hostIf, contIf, err := setupVeth(netns, br, args.IfName, hostName, mtu, c.hairpin())
	if err != nil {
		return nil, types.NewError(types.ErrInternal, "veth", err.Error())
	}
	res := newResult(args, br.Attrs(), hostIf, contIf, ips)
	err = netns.Do(func(ns.NetNS) error {
		disableDAD(args.IfName)
		return ipam.ConfigureIface(args.IfName, res)
	})
	if err != nil {
		return nil, types.NewError(types.ErrInternal, "configure pod interface", err.Error())
	}
	if c.ipMasq() {
		if err := ensureMasq(c.Name, sub); err != nil {
			return nil, types.NewError(types.ErrInternal, "masquerade", err.Error())
		}
	}
	if err := attachPolicy(c, args, res); err != nil {
		return nil, err
	}
	return res.GetAsVersion(c.CNIVersion)
}

// withDetails appends to a CNI error's details.
func withDetails(err error, more string) error {
	var te *types.Error
	if errors.As(err, &te) {
		d := te.Details
		if d != "" {
			d += "; "
		}
		return types.NewError(te.Code, te.Msg, d+more)
	}
	return fmt.Errorf("%w (%s)", err, more)
}

// newResult is the result of an attachment: bridge, host veth, pod
// interface, one address per family and a default route per family.
func newResult(args *skel.CmdArgs, br *netlink.LinkAttrs, hostIf, contIf net.Interface, ips []*current.IPConfig) *current.Result {
	res := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: br.Name, Mac: br.HardwareAddr.String()},
			{Name: hostIf.Name, Mac: hostIf.HardwareAddr.String()},
			{Name: contIf.Name, Mac: contIf.HardwareAddr.String(), Sandbox: args.Netns},
		},
	}
	for _, ipc := range ips {
		ipc.Interface = current.Int(2)
		res.IPs = append(res.IPs, ipc)
		dst := net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)}
		if ipc.Address.IP.To4() == nil {
			dst = net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
		}
		res.Routes = append(res.Routes, &types.Route{Dst: dst, GW: ipc.Gateway})
	}
	return res
}

// liveResult reads an existing attachment with addresses ips back from the
// node and the pod and rebuilds its result, failing with what is missing:
// the host veth on the bridge, the addresses, the pod interface carrying
// them.
func liveResult(c *NetConf, args *skel.CmdArgs, netns ns.NetNS, ips []*current.IPConfig) (*current.Result, error) {
	hostName := hostVethName(args.ContainerID, args.IfName)
	hl, err := netlink.LinkByName(hostName)
	if err != nil {
		return nil, fmt.Errorf("host veth %s: %w", hostName, err)
	}
	br, err := netlink.LinkByName(c.Bridge)
	if err != nil || hl.Attrs().MasterIndex != br.Attrs().Index {
		return nil, fmt.Errorf("host veth %s is not attached to bridge %s", hostName, c.Bridge)
	}
	if len(ips) == 0 {
		return nil, fmt.Errorf("no address recorded for %s/%s", args.ContainerID, args.IfName)
	}
	var cont net.Interface
	err = netns.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(args.IfName)
		if err != nil {
			return fmt.Errorf("pod interface %s: %w", args.IfName, err)
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("addresses of %s: %w", args.IfName, err)
		}
		for _, ipc := range ips {
			if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.IPNet.String() == ipc.Address.String() }) {
				return fmt.Errorf("%s lacks address %s", args.IfName, ipc.Address.String())
			}
		}
		cont = net.Interface{Name: l.Attrs().Name, HardwareAddr: l.Attrs().HardwareAddr}
		return nil
	})
	if err != nil {
		return nil, err
	}
	host := net.Interface{Name: hostName, HardwareAddr: hl.Attrs().HardwareAddr}
	return newResult(args, br.Attrs(), host, cont, ips), nil
}

// Del detaches the pod. Anything already gone (netns, link, allocation)
// counts as removed.
func Del(args *skel.CmdArgs) error {
	c, err := LoadConf(args.StdinData)
	if err != nil {
		return err
	}
	var errs []error
	if m, ok, err := existingIPAM(c); err != nil {
		errs = append(errs, err)
	} else if ok {
		errs = append(errs, m.release(args.ContainerID, args.IfName))
		m.close()
	}
	if args.Netns != "" {
		err := ns.WithNetNSPath(args.Netns, func(ns.NetNS) error { return delLink(args.IfName) })
		var nsErr ns.NSPathNotExistErr
		if err != nil && !errors.As(err, &nsErr) && !errors.Is(err, os.ErrNotExist) {
			if _, isNotNS := err.(ns.NSPathNotNSErr); !isNotNS {
				errs = append(errs, err)
			}
		}
	}
	errs = append(errs, delLink(hostVethName(args.ContainerID, args.IfName)))
	detachPolicy(c, args.ContainerID)
	if err := errors.Join(errs...); err != nil {
		return types.NewError(types.ErrInternal, "detach pod", err.Error())
	}
	return nil
}

// Check verifies that the attachment is as ADD left it.
func Check(args *skel.CmdArgs) error {
	c, err := LoadConf(args.StdinData)
	if err != nil {
		return err
	}
	if c.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "CHECK needs prevResult", "")
	}
	prev, err := current.NewResultFromResult(c.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "prevResult", err.Error())
	}
	netns, err := ns.GetNS(args.Netns)
	if err != nil {
		return types.NewError(types.ErrInvalidNetNS, "cannot open the pod's network namespace", err.Error())
	}
	defer netns.Close()
	fail := func(format string, a ...any) error {
		return types.NewError(types.ErrInternal, "check failed", fmt.Sprintf(format, a...))
	}
	m, ok, err := existingIPAM(c)
	if err != nil || !ok {
		return fail("no IPAM state: %v", err)
	}
	defer m.close()
	if !m.has(args.ContainerID, args.IfName) {
		return fail("no address allocated to %s/%s", args.ContainerID, args.IfName)
	}
	if _, err := liveResult(c, args, netns, prev.IPs); err != nil {
		return fail("%v", err)
	}
	return netns.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(args.IfName)
		if err != nil {
			return fail("pod interface %s: %v", args.IfName, err)
		}
		for _, r := range prev.Routes {
			routes, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{LinkIndex: l.Attrs().Index}, netlink.RT_FILTER_OIF)
			if err != nil {
				return fail("routes: %v", err)
			}
			if !slices.ContainsFunc(routes, func(x netlink.Route) bool {
				ones, _ := r.Dst.Mask.Size()
				return (x.Dst == nil && ones == 0 || x.Dst != nil && x.Dst.String() == r.Dst.String()) && x.Gw.Equal(r.GW)
			}) {
				return fail("route %s via %s missing", r.Dst.String(), r.GW)
			}
		}
		return nil
	})
}

// Status reports whether ADD can work: 50 until tulled holds a lease, 51
// while tulled is not running (pods on this node cannot reach other nodes).
func Status(args *skel.CmdArgs) error {
	c, err := LoadConf(args.StdinData)
	if err != nil {
		return err
	}
	if _, err := api.ReadSubnetFile(c.RunDir); err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "tulled holds no lease yet", err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := api.Get(ctx, filepath.Join(c.RunDir, api.SocketName)); err != nil {
		return types.NewError(types.ErrLimitedConnectivity, "tulled is not running: pods have no connectivity to other nodes", err.Error())
	}
	return nil
}

// GC frees every allocation and host veth on the bridge that belongs to no
// attachment in cni.dev/valid-attachments.
func GC(args *skel.CmdArgs) error {
	c, err := LoadConf(args.StdinData)
	if err != nil {
		return err
	}
	valid := map[attachment]bool{}
	hostNames := map[string]bool{}
	for _, a := range c.ValidAttachments {
		valid[attachment{a.ContainerID, a.IfName}] = true
		hostNames[hostVethName(a.ContainerID, a.IfName)] = true
	}
	var errs []error
	if m, ok, err := existingIPAM(c); err != nil {
		errs = append(errs, err)
	} else if ok {
		if _, err := m.gc(valid); err != nil {
			errs = append(errs, err)
		}
		m.close()
	}
	if br, err := netlink.LinkByName(c.Bridge); err == nil {
		links, err := netlink.LinkList()
		if err != nil {
			errs = append(errs, err)
		}
		for _, l := range links {
			name := l.Attrs().Name
			if l.Attrs().MasterIndex == br.Attrs().Index && strings.HasPrefix(name, "tl") && len(name) == 14 && !hostNames[name] {
				errs = append(errs, delLink(name))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return types.NewError(types.ErrInternal, "garbage collection", err.Error())
	}
	return nil
}
