// Package local is the embedded lease store: a directory shared by the tulled
// instances of one host (or of hosts sharing a file system with working
// flock). It is the default store and the one the demo and tests use.
//
// Each lease is a JSON file named after its subnet ("100.96.3.0-24.json").
// A subnet is claimed by atomically creating its file (link(2) of a fully
// written temporary file, so readers never see a partial lease). Every
// mutation (claim, renew, release, takeover of an expired lease) holds an
// exclusive flock on DIR/.lock, so a renewal can never overwrite a takeover.
// Readers take no lock: files only ever change by rename.
//
// The store owns the directory's *.json, .lock and .tmp-* files and nothing
// else.
package local

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/lease"
)

// Defaults for Options.
const (
	DefaultTTL          = time.Hour
	DefaultPollInterval = time.Second
)

// Options configure a Store.
type Options struct {
	// Dir is the shared lease directory; it is created if missing.
	Dir string
	// Net gives the networks, subnet lengths and ranges to allocate from.
	Net *netconf.Config
	// TTL is how long a lease lives without renewal (DefaultTTL if zero).
	TTL time.Duration
	// PollInterval bounds how late WatchPeers notices expiry or a change
	// inotify missed (DefaultPollInterval if zero).
	PollInterval time.Duration
	Logger       *slog.Logger
	// Now is the clock (time.Now if nil); tests move it.
	Now func() time.Time
}

// Store is a lease.Store backed by a directory.
type Store struct {
	opt Options
	log *slog.Logger

	warnMu sync.Mutex
	warned map[string]string // file name -> what was reported, to log bad files once
}

var _ lease.Store = (*Store)(nil)

// New returns a store on opt.Dir, creating the directory if needed.
func New(opt Options) (*Store, error) {
	if opt.Net == nil {
		return nil, errors.New("local lease store: no network config")
	}
	if opt.TTL <= 0 {
		opt.TTL = DefaultTTL
	}
	if opt.PollInterval <= 0 {
		opt.PollInterval = DefaultPollInterval
	}
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	if opt.Now == nil {
		opt.Now = time.Now
	}
	if err := os.MkdirAll(opt.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("lease dir %s: %w", opt.Dir, err)
	}
	return &Store{opt: opt, log: opt.Logger.With("store", "local", "dir", opt.Dir), warned: map[string]string{}}, nil
}

// TTL returns the lease lifetime the store grants.
func (s *Store) TTL() time.Duration { return s.opt.TTL }

// fileName maps a lease key to its file name: '/' and ':' are not kind to
// file systems and shells.
func fileName(key netip.Prefix) string {
	r := strings.NewReplacer("/", "-", ":", "_")
	return r.Replace(key.String()) + ".json"
}

// lock takes the store's exclusive mutation lock.
func (s *Store) lock() (unlock func(), err error) {
	f, err := os.OpenFile(filepath.Join(s.opt.Dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("flock %s: %w", f.Name(), err)
	}
	return func() { f.Close() }, nil // closing drops the flock
}

// readAll returns every well-formed lease file in the directory.
func (s *Store) readAll() ([]lease.Lease, error) {
	ents, err := os.ReadDir(s.opt.Dir)
	if err != nil {
		return nil, fmt.Errorf("read lease dir: %w", err)
	}
	out := make([]lease.Lease, 0, len(ents))
	for _, e := range ents {
		name := e.Name()
		if e.IsDir() || !strings.HasSuffix(name, ".json") || strings.HasPrefix(name, ".") {
			continue
		}
		l, err := s.readFile(name)
		if errors.Is(err, fs.ErrNotExist) {
			continue // released between ReadDir and open
		}
		if err != nil {
			s.warnOnce(name, err)
			continue
		}
		out = append(out, l)
	}
	return out, nil
}

func (s *Store) readFile(name string) (lease.Lease, error) {
	var l lease.Lease
	b, err := os.ReadFile(filepath.Join(s.opt.Dir, name))
	if err != nil {
		return l, err
	}
	if err := json.Unmarshal(b, &l); err != nil {
		return l, fmt.Errorf("malformed lease: %w", err)
	}
	if l.Node == "" || !l.Key().IsValid() {
		return l, errors.New("malformed lease: no node or subnet")
	}
	if fileName(l.Key()) != name {
		return l, fmt.Errorf("lease for %s stored under the wrong name", l.Key())
	}
	if err := s.opt.Net.CheckSubnets(l.Subnet, l.IPv6Subnet); err != nil {
		return l, fmt.Errorf("lease of %s: %w", l.Node, err)
	}
	return l, nil
}

func (s *Store) warnOnce(name string, err error) {
	s.warnMu.Lock()
	defer s.warnMu.Unlock()
	if s.warned[name] == err.Error() {
		return
	}
	s.warned[name] = err.Error()
	s.log.Warn("ignoring lease file", "file", name, "err", err)
}

// write stores l. With create set it fails with fs.ErrExist when the file
// exists; otherwise it atomically replaces it.
func (s *Store) write(l lease.Lease, create bool) error {
	b, err := json.MarshalIndent(l, "", "  ")
	if err != nil {
		return err
	}
	var rnd [8]byte
	rand.Read(rnd[:])
	tmp := filepath.Join(s.opt.Dir, ".tmp-"+hex.EncodeToString(rnd[:]))
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write lease %s: %w", l.Key(), err)
	}
	defer os.Remove(tmp)
	dst := filepath.Join(s.opt.Dir, fileName(l.Key()))
	if create {
		err = os.Link(tmp, dst) // atomic create-if-absent
	} else {
		err = os.Rename(tmp, dst)
	}
	if err != nil {
		return fmt.Errorf("store lease %s: %w", l.Key(), err)
	}
	return nil
}

// Claim implements lease.Store.
func (s *Store) Claim(ctx context.Context, node string, attrs lease.Attrs) (lease.Lease, error) {
	if node == "" {
		return lease.Lease{}, errors.New("claim: empty node name")
	}
	unlock, err := s.lock()
	if err != nil {
		return lease.Lease{}, err
	}
	defer unlock()
	all, err := s.readAll()
	if err != nil {
		return lease.Lease{}, err
	}
	now := s.opt.Now()
	expires := now.Add(s.opt.TTL)

	// A node gets its own subnet back, expired or not, as long as nobody
	// took it over; unless another live tulled holds the name.
	for _, l := range all {
		if l.Node == node && l.HeldByOther(attrs, l.Expiration.Sub(l.Renewed), now) {
			return lease.Lease{}, lease.InUseError(&l, attrs, now)
		}
	}
	for _, l := range all {
		if l.Node == node && s.fitsConfig(&l) {
			l.Attrs, l.Expiration, l.Renewed = attrs, expires, now
			if err := s.write(l, false); err != nil {
				return lease.Lease{}, err
			}
			s.log.Info("lease reacquired", "node", node, "subnet", l.Key())
			return l, nil
		}
	}

	used4, used6 := map[netip.Prefix]bool{}, map[netip.Prefix]bool{}
	var expired []lease.Lease
	for _, l := range all {
		if !l.Expiration.After(now) || l.Node == node {
			// Expired leases are free for the taking; a lease of this node
			// that no longer fits the config is stale.
			expired = append(expired, l)
			continue
		}
		used4[l.Subnet] = true
		used6[l.IPv6Subnet] = true
	}
	nl := lease.Lease{Node: node, Attrs: attrs, Expiration: expires, Renewed: now}
	c := s.opt.Net
	if c.EnableIPv4 {
		if nl.Subnet, err = pickFree(c.SubnetMin, c.SubnetMax, c.SubnetLen, used4); err != nil {
			return lease.Lease{}, fmt.Errorf("claim IPv4 subnet in %s: %w", c.Network, err)
		}
	}
	if c.EnableIPv6 {
		if nl.IPv6Subnet, err = pickFree(c.IPv6SubnetMin, c.IPv6SubnetMax, c.IPv6SubnetLen, used6); err != nil {
			return lease.Lease{}, fmt.Errorf("claim IPv6 subnet in %s: %w", c.IPv6Network, err)
		}
	}
	// Remove expired leases that stand in the way of the new one (same file
	// name or same IPv6 subnet); others stay so their nodes can come back.
	for _, l := range expired {
		if l.Key() == nl.Key() || (l.IPv6Subnet.IsValid() && l.IPv6Subnet == nl.IPv6Subnet) || l.Node == node {
			if err := os.Remove(filepath.Join(s.opt.Dir, fileName(l.Key()))); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return lease.Lease{}, fmt.Errorf("take over expired lease %s: %w", l.Key(), err)
			}
			s.log.Info("expired lease taken over", "subnet", l.Key(), "was", l.Node, "by", node)
		}
	}
	if err := s.write(nl, true); err != nil {
		return lease.Lease{}, err
	}
	s.log.Info("lease claimed", "node", node, "subnet", nl.Subnet, "ipv6Subnet", nl.IPv6Subnet)
	return nl, nil
}

// fitsConfig reports whether l's subnets match the configured families and
// ranges, so a config change does not hand a node a stale subnet.
func (s *Store) fitsConfig(l *lease.Lease) bool {
	c := s.opt.Net
	in := func(p netip.Prefix, min, max netip.Addr, bits int) bool {
		return p.IsValid() && p.Bits() == bits && !p.Addr().Less(min) && !max.Less(p.Addr())
	}
	if c.EnableIPv4 != l.Subnet.IsValid() || c.EnableIPv6 != l.IPv6Subnet.IsValid() {
		return false
	}
	if c.EnableIPv4 && !in(l.Subnet, c.SubnetMin, c.SubnetMax, c.SubnetLen) {
		return false
	}
	return !c.EnableIPv6 || in(l.IPv6Subnet, c.IPv6SubnetMin, c.IPv6SubnetMax, c.IPv6SubnetLen)
}

// pickFree returns a free subnet, starting at a random one so that nodes
// claiming at once rarely contend for the same file.
func pickFree(min, max netip.Addr, bits int, used map[netip.Prefix]bool) (netip.Prefix, error) {
	n := netconf.SubnetCount(min, max, bits)
	start := 0
	if r, err := rand.Int(rand.Reader, big.NewInt(int64(n))); err == nil {
		start = int(r.Int64())
	}
	for i := range n {
		p := netconf.SubnetAt(min, bits, (start+i)%n)
		if !used[p] {
			return p, nil
		}
	}
	return netip.Prefix{}, lease.ErrExhausted
}

// Renew implements lease.Store.
func (s *Store) Renew(ctx context.Context, l lease.Lease) (lease.Lease, error) {
	unlock, err := s.lock()
	if err != nil {
		return l, err
	}
	defer unlock()
	cur, err := s.readFile(fileName(l.Key()))
	if errors.Is(err, fs.ErrNotExist) {
		return l, fmt.Errorf("renew %s: %w (file removed)", l.Key(), lease.ErrLost)
	}
	if err != nil {
		return l, fmt.Errorf("renew %s: %w", l.Key(), err)
	}
	if cur.Node != l.Node || cur.IPv6Subnet != l.IPv6Subnet {
		return l, fmt.Errorf("renew %s: %w (now held by %s)", l.Key(), lease.ErrLost, cur.Node)
	}
	l.Renewed = s.opt.Now()
	l.Expiration = l.Renewed.Add(s.opt.TTL)
	if err := s.write(l, false); err != nil {
		return l, err
	}
	return l, nil
}

// Release implements lease.Store.
func (s *Store) Release(ctx context.Context, l lease.Lease) error {
	unlock, err := s.lock()
	if err != nil {
		return err
	}
	defer unlock()
	name := fileName(l.Key())
	cur, err := s.readFile(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err == nil && cur.Node != l.Node {
		return nil // someone else's now: ours is already gone
	}
	if err := os.Remove(filepath.Join(s.opt.Dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("release %s: %w", l.Key(), err)
	}
	s.log.Info("lease released", "node", l.Node, "subnet", l.Key())
	return nil
}

// Lookup returns the lease the node holds, live or expired.
func (s *Store) Lookup(_ context.Context, node string) (lease.Lease, bool, error) {
	all, err := s.readAll()
	if err != nil {
		return lease.Lease{}, false, err
	}
	for _, l := range all {
		if l.Node == node {
			return l, true, nil
		}
	}
	return lease.Lease{}, false, nil
}

// List returns every lease in the store, expired ones included, sorted.
func (s *Store) List() ([]lease.Lease, error) {
	all, err := s.readAll()
	if err != nil {
		return nil, err
	}
	lease.SortPeers(all)
	return all, nil
}

// peers returns the live leases of nodes other than self, sorted.
func (s *Store) peers(self string) ([]lease.Peer, error) {
	all, err := s.readAll()
	if err != nil {
		return nil, err
	}
	now := s.opt.Now()
	out := all[:0]
	for _, l := range all {
		if l.Node != self && l.Expiration.After(now) {
			out = append(out, l)
		}
	}
	lease.SortPeers(out)
	return out, nil
}

// WatchPeers implements lease.Store. Changes are noticed through inotify at
// once and by polling every PollInterval (expiry, missed events).
func (s *Store) WatchPeers(ctx context.Context, self string) (<-chan []lease.Peer, error) {
	first, err := s.peers(self)
	if err != nil {
		return nil, err
	}
	wake, closeWatch := s.inotify()
	ch := make(chan []lease.Peer, 1)
	ch <- first
	go func() {
		defer closeWatch()
		t := time.NewTicker(s.opt.PollInterval)
		defer t.Stop()
		last := first
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			case <-wake:
			}
			cur, err := s.peers(self)
			if err != nil {
				s.log.Warn("watch peers", "err", err)
				continue
			}
			if lease.PeersEqual(cur, last) {
				continue
			}
			last = cur
			select { // keep only the newest snapshot for a slow consumer
			case <-ch:
			default:
			}
			ch <- cur
		}
	}()
	return ch, nil
}

// inotify returns a channel that fires when the directory changes. Without
// inotify (an error setting it up) the channel never fires and polling alone
// keeps the watch current.
func (s *Store) inotify() (<-chan struct{}, func()) {
	wake := make(chan struct{}, 1)
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		s.log.Warn("inotify unavailable, polling only", "err", err)
		return wake, func() {}
	}
	mask := uint32(unix.IN_CREATE | unix.IN_DELETE | unix.IN_MOVED_TO | unix.IN_MOVED_FROM | unix.IN_CLOSE_WRITE)
	if _, err := unix.InotifyAddWatch(fd, s.opt.Dir, mask); err != nil {
		unix.Close(fd)
		s.log.Warn("inotify watch failed, polling only", "err", err)
		return wake, func() {}
	}
	f := os.NewFile(uintptr(fd), "inotify") // non-blocking: Close unblocks Read
	go func() {
		buf := make([]byte, 4096)
		for {
			if _, err := f.Read(buf); err != nil {
				return
			}
			select {
			case wake <- struct{}{}:
			default:
			}
		}
	}()
	return wake, func() { f.Close() }
}
