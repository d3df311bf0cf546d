package cni

import (
	"context"
	"errors"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/tulle-net/tulle/internal/api"
)

// k8sArgs are the CNI_ARGS a Kubernetes runtime passes.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE types.UnmarshallableString //nolint:revive // the runtime's names
	K8S_POD_NAME      types.UnmarshallableString //nolint:revive
	K8S_POD_UID       types.UnmarshallableString //nolint:revive
}

// attachPolicy tells tulled which pod now holds the addresses and waits
// until the pod's NetworkPolicy rules are in place, so its first packet
// meets them. Without pod arguments (not Kubernetes) there is nothing to
// police. With no tulled answering, ADD goes on: tulled's table drops
// every local address it was not told about, so the pod stays cut off
// (never unpoliced) until tulled learns it from the API server.
func attachPolicy(c *NetConf, args *skel.CmdArgs, res *current.Result) error {
	var ka k8sArgs
	if err := types.LoadArgs(args.Args, &ka); err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_ARGS", err.Error())
	}
	if ka.K8S_POD_NAMESPACE == "" || ka.K8S_POD_NAME == "" {
		return nil
	}
	a := api.Attachment{Namespace: string(ka.K8S_POD_NAMESPACE), Name: string(ka.K8S_POD_NAME), UID: string(ka.K8S_POD_UID), ContainerID: args.ContainerID}
	for _, ipc := range res.IPs {
		if ip, ok := netip.AddrFromSlice(ipc.Address.IP); ok {
			a.IPs = append(a.IPs, ip.Unmap())
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	err := api.Attach(ctx, filepath.Join(c.RunDir, api.SocketName), a)
	if err == nil || errors.Is(err, api.ErrUnreachable) {
		return nil
	}
	return types.NewError(types.ErrTryAgainLater, "tulled could not put the pod's NetworkPolicy rules in place", err.Error())
}

// detachPolicy tells tulled a container is gone (best effort: tulled also
// forgets pods the API server deletes).
func detachPolicy(c *NetConf, containerID string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	api.Detach(ctx, filepath.Join(c.RunDir, api.SocketName), containerID)
}
