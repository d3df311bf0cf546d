// Command tulle is tulle's CNI plugin (type "tulle"). See package cni.
package main

import (
	"runtime"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/tulle-net/tulle/cni"
)

func init() {
	// Namespace switches apply to the OS thread: keep main on one.
	runtime.LockOSThread()
}

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add: func(args *skel.CmdArgs) error {
			res, err := cni.Add(args)
			if err != nil {
				return err
			}
			return types.PrintResult(res, res.Version())
		},
		Del:    cni.Del,
		Check:  cni.Check,
		Status: cni.Status,
		GC:     cni.GC,
	}, version.All, "tulle CNI plugin: pods on tulle's userspace overlay")
}
