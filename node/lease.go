package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/lease"
)

// holder holds the node's lease: it claims it, renews it, and republishes
// it when what the node says of itself changes (a rotated key).
type holder struct {
	store lease.Store
	ttl   time.Duration
	log   *slog.Logger
	// republish carries new attributes to the renew loop.
	republish chan lease.Attrs
	// renewOK and renewErr count renewals.
	renewOK, renewErr atomic.Uint64

	mu    sync.Mutex
	lease lease.Lease // as last renewed
}

// claim claims the node's lease, publishing its underlay and what its
// backends speak.
func claim(ctx context.Context, c Config, store lease.Store, u encap.Underlay, sp speakers, log *slog.Logger) (*holder, error) {
	l, err := store.Claim(ctx, c.Node, sp.attrs(c.Backends, c.Net, u))
	if errors.Is(err, lease.ErrInUse) {
		return nil, netconf.Errorf("flag --node-name: %v", err)
	}
	if err != nil {
		return nil, fmt.Errorf("claim lease: %w", err)
	}
	mtu, _ := sp.sizes(u.MTU)
	log.Info("lease held", "subnet", l.Subnet, "ipv6Subnet", l.IPv6Subnet, "underlay", u.Iface, "public_ip", u.IP4, "public_ipv6", u.IP6, "mtu", mtu)
	return &holder{store: store, ttl: c.LeaseTTL, log: log, republish: make(chan lease.Attrs, 1), lease: l}, nil
}

// current is the lease as last renewed.
func (h *holder) current() lease.Lease {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.lease
}

// publish has the renew loop publish caps at once; a newer set replaces
// one not yet published.
func (h *holder) publish(caps map[string]encap.Capability) {
	a := h.current().Attrs
	a.Backends = encap.Publish(caps)
	select {
	case <-h.republish:
	default:
	}
	h.republish <- a
}

// renew extends the lease every lease.RenewInterval, and at once with new
// attributes. A failed renewal is retried with backoff (1 s doubling, at
// most a quarter of the interval), so a store that comes back in time
// never sees the lease expire. Losing the lease is fatal: the subnet's
// pods are now someone else's addresses.
func (h *holder) renew(ctx context.Context) error {
	l := h.current()
	interval := lease.RenewInterval(h.ttl)
	wait, backoff := interval, time.Duration(0)
	for {
		select {
		case <-ctx.Done():
			return nil
		case a := <-h.republish:
			l.Attrs = a
		case <-time.After(wait):
		}
		nl, err := h.store.Renew(ctx, l)
		if errors.Is(err, lease.ErrLost) {
			return fmt.Errorf("lease %s: %w", l.Key(), err)
		}
		if err != nil {
			backoff = min(max(2*backoff, time.Second), interval/4)
			h.renewErr.Add(1)
			h.log.Warn("renew lease; retrying", "subnet", l.Key(), "in", backoff, "expires", l.Expiration, "err", err)
			wait = backoff
			continue
		}
		if backoff > 0 {
			h.log.Info("lease renewed again", "subnet", l.Key())
		}
		l, wait, backoff = nl, interval, 0
		h.renewOK.Add(1)
		h.mu.Lock()
		h.lease = l
		h.mu.Unlock()
	}
}
