package cni

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"

	"sigs.k8s.io/knftables"

	"github.com/tulle-net/tulle/internal/api"
)

var nftUnsafe = regexp.MustCompile(`[^a-zA-Z0-9_]`)

// masqTable names the nftables table of a network.
func masqTable(network string) string {
	return "tulle_" + nftUnsafe.ReplaceAllString(network, "_")
}

// ensureMasq (re)writes, atomically (one nftables transaction through
// knftables), the network's table: traffic from the node's pod subnets to
// anywhere outside the cluster networks is masqueraded to the node's
// address; traffic inside the cluster keeps pod addresses end to end.
func ensureMasq(network string, sub *api.SubnetFile) error {
	nft, err := knftables.New(knftables.InetFamily, masqTable(network))
	if err != nil {
		return fmt.Errorf("nft: %w", err)
	}
	tx := nft.NewTransaction()
	tx.Add(&knftables.Table{Comment: knftables.PtrTo("tulle CNI: masquerade of pod traffic leaving the cluster")})
	tx.Flush(&knftables.Table{})
	tx.Add(&knftables.Chain{Name: "postrouting", Type: knftables.PtrTo(knftables.NATType), Hook: knftables.PtrTo(knftables.PostroutingHook),
		Priority: knftables.PtrTo(knftables.SNATPriority)})
	for _, r := range []struct {
		fam             string
		subnet, cluster netip.Prefix
	}{{"ip", sub.Subnet, sub.Network}, {"ip6", sub.IPv6Subnet, sub.IPv6Network}} {
		if r.subnet.IsValid() {
			tx.Add(&knftables.Rule{Chain: "postrouting", Rule: knftables.Concat(r.fam, "saddr", r.subnet.Masked(), r.fam, "daddr", "!=", r.cluster.Masked(), "masquerade")})
		}
	}
	if err := nft.Run(context.Background(), tx); err != nil {
		return fmt.Errorf("nft: %w", err)
	}
	return nil
}
