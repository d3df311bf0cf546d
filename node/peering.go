package node

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/lease"
)

// peering follows the store's peer snapshots: for each it chooses a
// backend for every peer and programs the backends, the datapath and
// the router.
type peering struct {
	store   lease.Store
	node    string
	table   encap.Table
	local   encap.Local
	subnets []netip.Prefix // this node's
	fw      *forwarder
	sp      speakers
	log     *slog.Logger

	// snapshots counts the snapshots from the store.
	snapshots atomic.Uint64
	mu        sync.Mutex
	last      []api.Peer // the last plan: every peer, its backend and why
}

func newPeering(c Config, store lease.Store, u encap.Underlay, l lease.Lease, sp speakers, fw *forwarder, log *slog.Logger) *peering {
	return &peering{store: store, node: c.Node, table: c.Backends, local: sp.local(c.Net.Backend.Type, u), subnets: l.Subnets(), fw: fw, sp: sp, log: log}
}

// view is the last plan as the status shows it.
func (p *peering) view() []api.Peer {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.last
}

func (p *peering) run(ctx context.Context) error {
	ch, err := p.store.WatchPeers(ctx, p.node)
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
		plan := p.table.Plan(p.local, snap)
		view := p.logChanges(plan, known)
		pr := encap.Translate(p.subnets, plan)
		// The backends learn their peers before the table sends them
		// their frames.
		routes := p.sp.program(pr)
		p.fw.setPeers(pr.Datapath, routes)
		p.mu.Lock()
		p.last = view
		p.mu.Unlock()
		p.snapshots.Add(1)
	}
}

// logChanges logs each peer whose choice changed since the last plan, and
// each peer gone, and returns the plan as the status shows it.
func (p *peering) logChanges(plan []encap.Assignment, known map[string]string) []api.Peer {
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
			p.log.Warn("peer unreachable", "peer", a.Peer.Node, "reason", a.Reason)
		} else {
			p.log.Info("peer up", "peer", a.Peer.Node, "backend", a.Backend, "reason", a.Reason, "endpoint", a.Endpoint, "subnets", a.Peer.Subnets())
		}
	}
	for n := range known {
		if !seen[n] {
			p.log.Info("peer gone", "peer", n)
			delete(known, n)
		}
	}
	return view
}
