package main

import (
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/tulle-net/tulle/lease"
)

func printLeases(all []lease.Lease, now time.Time) error {
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NODE\tSUBNET\tIPV6 SUBNET\tUNDERLAY\tBACKEND\tEXPIRES")
	for _, l := range all {
		u := l.Attrs.PublicIP.String()
		if !l.Attrs.PublicIP.IsValid() {
			u = l.Attrs.PublicIPv6.String()
		}
		exp := "in " + l.Expiration.Sub(now).Round(time.Second).String()
		if !l.Expiration.After(now) {
			exp = "expired"
		}
		sub, sub6 := "-", "-"
		if l.Subnet.IsValid() {
			sub = l.Subnet.String()
		}
		if l.IPv6Subnet.IsValid() {
			sub6 = l.IPv6Subnet.String()
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s:%d\t%s\n", l.Node, sub, sub6, u, l.Attrs.Backend.Type, l.Attrs.Backend.Port, exp)
	}
	return w.Flush()
}
