package kube

import (
	"context"
	"errors"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

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

// Lookup returns the lease node holds, for cleanup.
func (s *Store) Lookup(ctx context.Context, node string) (lease.Lease, bool, error) {
	if s.opt.Mode == ModeLease {
		list, err := s.opt.Client.CoordinationV1().Leases(s.opt.Namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			return lease.Lease{}, false, err
		}
		for i := range list.Items {
			if ptrString(list.Items[i].Spec.HolderIdentity) == node {
				l, err := s.toLease(&list.Items[i])
				return l, err == nil, nil
			}
		}
		return lease.Lease{}, false, nil
	}
	_, err := s.opt.Client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return lease.Lease{}, false, nil
	}
	return lease.Lease{Node: node}, err == nil, err
}
