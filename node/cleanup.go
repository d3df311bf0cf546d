package node

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/policy"
	"github.com/tulle-net/tulle/tunnel"
)

// Cleanup removes what a node added: routes, device, the backends' kernel
// state, the policy table, the lease, run files. Everything already gone
// counts as removed.
func Cleanup(c Config, log *slog.Logger) error {
	var errs []error
	if err := tunnel.Cleanup(c.TUN, networks(c.Net)); err != nil {
		errs = append(errs, err)
	}
	for _, b := range c.Backends {
		if err := b.Cleanup(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := policy.Cleanup(context.Background()); err != nil {
		errs = append(errs, err)
	}
	if _, store, err := openStore(c, log); err != nil {
		errs = append(errs, err)
	} else if l, ok, err := store.Lookup(context.Background(), c.Node); err != nil {
		errs = append(errs, err)
	} else if ok {
		errs = append(errs, store.Release(context.Background(), l))
	}
	for _, f := range []string{api.SubnetFileName, api.SocketName} {
		if err := os.Remove(filepath.Join(c.RunDir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	log.Info("cleaned up", "tun", c.TUN)
	return nil
}
