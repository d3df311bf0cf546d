package kube

import (
	"context"
	"errors"

	"github.com/tulle-net/tulle/lease"
)

// Claim implements lease.Store. It blocks, retrying with backoff, until the
// API server answers (and, in podcidr mode, the Node has pod CIDRs).
func (s *Store) Claim(ctx context.Context, node string, attrs lease.Attrs) (lease.Lease, error) {
	if node == "" {
		return lease.Lease{}, errors.New("claim: empty node name")
	}
	if s.opt.Mode == ModeLease {
		return s.claimLease(ctx, node, attrs)
	}
	return s.claimPodCIDR(ctx, node, attrs)
}

// Renew implements lease.Store.
func (s *Store) Renew(ctx context.Context, l lease.Lease) (lease.Lease, error) {
	var nl lease.Lease
	var err error
	if s.opt.Mode == ModeLease {
		nl, err = s.renewLease(ctx, l)
	} else {
		nl, err = s.renewPodCIDR(ctx, l)
	}
	if err != nil && !errors.Is(err, lease.ErrLost) {
		s.setAPIErr(err)
	}
	return nl, err
}

// Release implements lease.Store.
func (s *Store) Release(ctx context.Context, l lease.Lease) error {
	if s.opt.Mode == ModeLease {
		return s.releaseLease(ctx, l)
	}
	return s.releasePodCIDR(ctx, l)
}

// WatchPeers implements lease.Store. The first snapshot comes once the
// informer has synced; while the API server is unreachable no snapshot
// comes, so the consumer keeps forwarding with the last one.
func (s *Store) WatchPeers(ctx context.Context, self string) (<-chan []lease.Peer, error) {
	if s.opt.Mode == ModeLease {
		return s.watchLeases(ctx, self)
	}
	return s.watchNodes(ctx, self)
}
