package cni

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/plugins/ipam/host-local/backend/allocator"
	"github.com/containernetworking/plugins/plugins/ipam/host-local/backend/disk"

	"github.com/tulle-net/tulle/internal/api"
)

// addrPool allocates pod addresses from the node's subnets with the reference
// plugins' host-local allocator and on-disk store: one file per address,
// created with O_EXCL under a directory lock, so allocations survive plugin
// crashes and two plugins never hand out the same address.
type addrPool struct {
	store  *disk.Store
	ranges []*allocator.RangeSet // one per family, IPv4 first
	nets   []netip.Prefix
	dir    string
}

func openIPAM(c *NetConf, sub *api.SubnetFile) (*addrPool, error) {
	store, err := disk.New(c.Name, c.DataDir)
	if err != nil {
		return nil, fmt.Errorf("ipam store %s: %w", filepath.Join(c.DataDir, c.Name), err)
	}
	m := &addrPool{store: store, dir: filepath.Join(c.DataDir, c.Name)}
	for _, p := range []netip.Prefix{sub.Subnet, sub.IPv6Subnet} {
		if !p.IsValid() {
			continue
		}
		r := allocator.Range{Subnet: types.IPNet(toIPNet(p)), Gateway: gateway(p).AsSlice()}
		rs := allocator.RangeSet{r}
		if err := rs.Canonicalize(); err != nil {
			store.Close()
			return nil, fmt.Errorf("ipam range %s: %w", p, err)
		}
		m.ranges = append(m.ranges, &rs)
		m.nets = append(m.nets, p.Masked())
	}
	return m, nil
}

func (m *addrPool) close() { m.store.Close() }

// gateway is the subnet's first host address: the bridge's address and the
// pods' default gateway. (The subnet's own first address is tulled's.)
func gateway(p netip.Prefix) netip.Addr { return p.Masked().Addr().Next() }

func toIPNet(p netip.Prefix) net.IPNet {
	return net.IPNet{IP: p.Masked().Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

var errExhausted = errors.New("no free address")

// allocate gets one address per family for an attachment that holds none.
// On failure it frees what this call allocated and nothing else: an
// attachment's existing addresses are never touched here.
func (m *addrPool) allocate(id, ifname string) ([]*current.IPConfig, error) {
	var out []*current.IPConfig
	for i, rs := range m.ranges {
		a := allocator.NewIPAllocator(rs, m.store, i)
		ipc, err := a.Get(id, ifname, nil)
		if err != nil {
			if rerr := m.releaseIPs(id, ifname, out); rerr != nil {
				err = errors.Join(err, fmt.Errorf("undo: %w", rerr))
			}
			if strings.Contains(err.Error(), "no IP addresses available") {
				return nil, fmt.Errorf("%w in %s", errExhausted, m.nets[i])
			}
			return nil, err
		}
		out = append(out, ipc)
	}
	return out, nil
}

// releaseIPs frees exactly the given addresses, each only while it is still
// recorded for the attachment.
func (m *addrPool) releaseIPs(id, ifname string, ips []*current.IPConfig) error {
	m.store.Lock()
	defer m.store.Unlock()
	want := strings.TrimSpace(id) + disk.LineBreak + ifname
	var errs []error
	for _, ipc := range ips {
		path := filepath.Join(m.dir, ipc.Address.IP.String())
		b, err := os.ReadFile(path)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if strings.TrimSpace(string(b)) != want {
			continue // someone else's now
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("release %s: %w", ipc.Address.IP, err))
		}
	}
	return errors.Join(errs...)
}

// held returns the attachment's recorded addresses as IP configurations of
// the node's subnets (gateway included), IPv4 first.
func (m *addrPool) held(id, ifname string) []*current.IPConfig {
	var out []*current.IPConfig
	ips := m.store.GetByID(id, ifname)
	for _, n := range m.nets {
		for _, ip := range ips {
			a, ok := netip.AddrFromSlice(ip)
			if !ok || !n.Contains(a.Unmap()) {
				continue
			}
			ipn := toIPNet(n)
			ipn.IP = a.Unmap().AsSlice()
			out = append(out, &current.IPConfig{Address: ipn, Gateway: gateway(n).AsSlice()})
		}
	}
	return out
}

// release frees every address of the attachment; none is fine.
func (m *addrPool) release(id, ifname string) error {
	m.store.Lock()
	defer m.store.Unlock()
	return m.store.ReleaseByID(id, ifname)
}

// has reports whether the attachment holds addresses.
func (m *addrPool) has(id, ifname string) bool { return m.store.FindByID(id, ifname) }

// gc releases every allocation whose attachment is not in valid and returns
// how many it freed.
func (m *addrPool) gc(valid map[attachment]bool) (int, error) {
	m.store.Lock()
	defer m.store.Unlock()
	ents, err := os.ReadDir(m.dir)
	if err != nil {
		return 0, err
	}
	freed := 0
	for _, e := range ents {
		name := e.Name()
		if e.IsDir() || net.ParseIP(name) == nil {
			continue // lock and last_reserved_ip files
		}
		b, err := os.ReadFile(filepath.Join(m.dir, name))
		if err != nil {
			continue
		}
		id, ifname, _ := strings.Cut(strings.TrimSpace(string(b)), disk.LineBreak)
		if valid[attachment{strings.TrimSpace(id), strings.TrimSpace(ifname)}] {
			continue
		}
		if err := os.Remove(filepath.Join(m.dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return freed, err
		}
		freed++
	}
	return freed, nil
}

// attachment identifies a pod's interface on the network.
type attachment struct{ id, ifname string }
