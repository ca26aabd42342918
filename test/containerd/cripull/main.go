// Command cripull makes the kubelet's image calls on a CRI runtime's socket
// with k8s.io/cri-api's client, for the end-to-end tests: it pulls, reports
// and removes images the way the kubelet (or crictl) does.
//
// Usage:
//
//	cripull --addr unix:///run/containerd/containerd.sock pull REF
//	cripull --addr ADDR status REF   (prints the image as JSON, or null)
//	cripull --addr ADDR rmi REF
//	cripull --addr ADDR version      (prints the runtime's name and version)
//
// A refused call prints the gRPC error as the kubelet logs it
// ("rpc error: code = ... desc = ...") on stderr and exits 1.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func main() {
	addr := flag.String("addr", "", "CRI endpoint, unix:///path/to/socket")
	timeout := flag.Duration("timeout", 2*time.Minute, "deadline of the call")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: cripull --addr unix:///SOCKET [--timeout D] pull|status|rmi REF | version")
	}
	flag.Parse()
	if *addr == "" || flag.NArg() < 1 || flag.NArg() > 2 || (flag.NArg() == 1) != (flag.Arg(0) == "version") {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*addr, *timeout, flag.Arg(0), flag.Arg(1)); err != nil {
		fmt.Fprintln(os.Stderr, "cripull:", err)
		os.Exit(1)
	}
}

func run(addr string, timeout time.Duration, verb, ref string) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	images := runtimeapi.NewImageServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	spec := &runtimeapi.ImageSpec{Image: ref}
	switch verb {
	case "pull":
		resp, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: spec})
		if err != nil {
			return fmt.Errorf("pull %s: %w", ref, err)
		}
		return printJSON(map[string]string{"imageRef": resp.ImageRef})
	case "status":
		resp, err := images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: spec})
		if err != nil {
			return fmt.Errorf("status %s: %w", ref, err)
		}
		if resp.Image == nil {
			return printJSON(nil)
		}
		return printJSON(map[string]any{"id": resp.Image.Id, "repoTags": resp.Image.RepoTags, "size": resp.Image.Size})
	case "version":
		resp, err := runtimeapi.NewRuntimeServiceClient(conn).Version(ctx, &runtimeapi.VersionRequest{})
		if err != nil {
			return fmt.Errorf("version: %w", err)
		}
		return printJSON(map[string]string{"runtimeName": resp.RuntimeName, "runtimeVersion": resp.RuntimeVersion})
	case "rmi":
		if _, err := images.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: spec}); err != nil {
			return fmt.Errorf("rmi %s: %w", ref, err)
		}
		return nil
	default:
		return fmt.Errorf("unknown command %q (pull, status, rmi, version)", verb)
	}
}

func printJSON(v any) error {
	return json.NewEncoder(os.Stdout).Encode(v)
}
