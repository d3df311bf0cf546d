package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tulle-net/tulle/internal/tstest/kubecluster"
)

// demoKube builds a real Kubernetes cluster on this machine
// (internal/tstest/kubecluster), installs tulle with kubectl apply -k deploy/,
// runs test pods on every node and prints who reaches whom; then removes
// everything (also on Ctrl-C). root is the tulle repository (make image).
func demoKube(ctx context.Context, root string, nodes int) (err error) {
	if nodes < 1 || nodes > 4 {
		return fmt.Errorf("--nodes %d: want 1 to 4 with --kube", nodes)
	}
	if why := kubecluster.Missing(); why != "" {
		return fmt.Errorf("demo --kube needs %s (make demo-kube installs and builds what is missing)", why)
	}
	root, err = filepath.Abs(root)
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(root, "deploy", "kustomization.yaml")); err != nil {
		return fmt.Errorf("--root %s: not the tulle repository (no deploy/kustomization.yaml)", root)
	}
	dir, err := os.MkdirTemp("", "tulle-demo-kube-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	step("starting a Kubernetes cluster: a control plane and %d nodes (containerd + kubelet + kube-proxy), each a network namespace on 198.18.0.0/24", nodes)
	start := time.Now()
	kc, err := kubecluster.Start(ctx, kubecluster.Options{Nodes: nodes, Dir: dir, Root: root, Prefix: "tulledemok",
		Logf: func(f string, a ...any) { fmt.Printf("    "+f+"\n", a...) }})
	if err != nil {
		return err
	}
	defer func() {
		step("cleaning up: pods, kubelets, containerd, the control plane, namespaces")
		if cerr := kc.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
		if ctx.Err() != nil {
			err = errors.New("interrupted; everything it made is removed")
		}
	}()
	fmt.Printf("    up in %s\n", time.Since(start).Round(time.Second))
	show := func(args ...string) error {
		out, err := kc.Kubectl(ctx, args...)
		fmt.Print(kubecluster.Indent(out, "    "))
		return err
	}

	tag := kubecluster.RandomTag("demo")
	step("installing tulle: make image (tulle:%s), imported on every node, kubectl apply -k deploy/ with that tag", tag)
	if err := kc.InstallTulle(ctx, kubecluster.Overlay{Tag: tag}); err != nil {
		return err
	}
	if err := kc.WaitTulle(ctx, 3*time.Minute); err != nil {
		return err
	}
	step("nodes")
	if err := show("get", "nodes", "-o", "wide"); err != nil {
		return err
	}
	if err := show("get", "nodes", "-o", "custom-columns=NODE:.metadata.name,POD-CIDRS:.spec.podCIDRs,NETWORK-UNAVAILABLE:.status.conditions[?(@.type=='NetworkUnavailable')].status,TULLE-PUBLIC-IP:.metadata.annotations.tulle\\.dev/public-ip"); err != nil {
		return err
	}
	step("tulle's pods")
	if err := show("-n", kubecluster.TulleNamespace, "get", "pods", "-o", "wide"); err != nil {
		return err
	}

	replicas := 2 * nodes
	step("a Deployment of %d test pods spread over the nodes, and a ClusterIP Service", replicas)
	if err := kc.WaitServiceAccount(ctx, "default"); err != nil {
		return err
	}
	if err := kc.DeployTestPods(ctx, "default", "echo", replicas); err != nil {
		return err
	}
	if err := show("get", "pods", "-o", "wide"); err != nil {
		return err
	}
	pods, err := kc.Pods(ctx, "default", "app=echo")
	if err != nil {
		return err
	}

	step("connectivity: each row's pod fetches http://<column's pod>:%d/ over IPv4 and IPv6", kubecluster.TestPodPort)
	failed, total := 0, 0
	fmt.Printf("    %-24s", "from \\ to")
	for _, p := range pods {
		fmt.Printf(" %-8s", short(p.Name))
	}
	fmt.Println()
	for i := range pods {
		from := &pods[i]
		fmt.Printf("    %-24s", short(from.Name)+" ("+from.Spec.NodeName+")")
		for j := range pods {
			if i == j {
				fmt.Printf(" %-8s", "-")
				continue
			}
			cell := ""
			for _, fam := range []int{4, 6} {
				total++
				if err := kc.Reach(ctx, from, &pods[j], fam); err != nil {
					failed++
					cell += "✗"
				} else {
					cell += "✓"
				}
			}
			fmt.Printf(" %-8s", cell)
		}
		fmt.Println()
	}
	svc, err := kc.Client.CoreV1().Services("default").Get(ctx, "echo", metav1.GetOptions{})
	if err != nil {
		return err
	}
	step("each pod → the Service %s:%d (kube-proxy, then tulle to endpoints on other nodes)", svc.Spec.ClusterIP, kubecluster.ServicePort)
	for i := range pods {
		total++
		who, err := kc.ViaService(ctx, &pods[i], svc.Spec.ClusterIP)
		if err != nil {
			failed++
			fmt.Printf("    FAIL %s: %v\n", pods[i].Name, err)
			continue
		}
		fmt.Printf("    ok   %s (%s) → answered by %s\n", pods[i].Name, pods[i].Spec.NodeName, who)
	}
	step("summary: %d/%d checks ok", total-failed, total)
	if failed > 0 {
		return fmt.Errorf("%d checks failed", failed)
	}
	return nil
}

// short is a pod name's last part (the Deployment's random suffix).
func short(name string) string {
	if i := strings.LastIndex(name, "-"); i >= 0 {
		return name[i+1:]
	}
	return name
}
