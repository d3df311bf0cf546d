package node

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// errNoBridgeNetfilter says what a Kubernetes node lacks without
// br_netfilter, and how to give it.
var errNoBridgeNetfilter = errors.New("br_netfilter is not loaded on this node (modprobe br_netfilter, and list it in /etc/modules-load.d): " +
	"a pod cannot reach a Service whose endpoint is on its own node, since the bridge between them bypasses kube-proxy's NAT")

// bridgeNetfilterCheck is a readiness check for nodes whose pods use
// Services: pods of one node share tulle's bridge, and only br_netfilter
// hands bridged packets to the IP hooks where kube-proxy's reverse NAT
// runs (the CNI plugin turns the bridge's own nf_call_iptables and
// nf_call_ip6tables on, so the namespace's bridge-nf-call-* sysctls may
// stay off; the module itself tulle cannot load without CAP_SYS_MODULE).
// procNet is /proc/sys/net, whose bridge directory exists in a network
// namespace exactly while the module is loaded.
func bridgeNetfilterCheck(procNet string) func() error {
	return func() error {
		if _, err := os.Stat(filepath.Join(procNet, "bridge", "bridge-nf-call-iptables")); err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return errNoBridgeNetfilter
			}
			return fmt.Errorf("check br_netfilter: %w", err)
		}
		return nil
	}
}
