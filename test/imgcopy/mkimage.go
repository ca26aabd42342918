package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"time"

	digest "github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	imgspecv1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// cmdMkimage writes a synthetic, reproducible OCI image layout: for the same
// flags it always produces the same blobs and digests.
func cmdMkimage(args []string) error {
	fs := flag.NewFlagSet("mkimage", flag.ExitOnError)
	n := fs.Int("layers", 1, "number of layers")
	out := fs.String("out", "", "OCI layout directory to create or add to")
	tag := fs.String("tag", "latest", "tag (org.opencontainers.image.ref.name)")
	size := fs.Int("size", 4096, "bytes of pseudo-random file content per layer")
	seed := fs.Uint64("seed", 1, "seed for the layer contents")
	fs.Parse(args)
	if *out == "" || *n < 1 || *size < 0 || fs.NArg() != 0 {
		return errors.New("mkimage: --out DIR and --layers N (N >= 1) are required")
	}
	if err := os.MkdirAll(filepath.Join(*out, "blobs", "sha256"), 0o755); err != nil {
		return err
	}
	created := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

	var layers []imgspecv1.Descriptor
	var diffIDs []digest.Digest
	var history []imgspecv1.History
	for i := 0; i < *n; i++ {
		plain, err := layerTar(*seed, i, *size)
		if err != nil {
			return err
		}
		var gz bytes.Buffer
		zw := gzip.NewWriter(&gz) // no name/mtime: reproducible
		if _, err := zw.Write(plain); err != nil {
			return err
		}
		if err := zw.Close(); err != nil {
			return err
		}
		desc, err := writeBlob(*out, imgspecv1.MediaTypeImageLayerGzip, gz.Bytes())
		if err != nil {
			return err
		}
		layers = append(layers, desc)
		diffIDs = append(diffIDs, digest.FromBytes(plain))
		history = append(history, imgspecv1.History{Created: &created, CreatedBy: fmt.Sprintf("imgcopy mkimage layer %d", i)})
	}

	cfg := imgspecv1.Image{
		Created:  &created,
		Platform: imgspecv1.Platform{Architecture: runtime.GOARCH, OS: "linux"},
		Config:   imgspecv1.ImageConfig{Cmd: []string{"/bin/sh"}},
		RootFS:   imgspecv1.RootFS{Type: "layers", DiffIDs: diffIDs},
		History:  history,
	}
	cfgBytes, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	cfgDesc, err := writeBlob(*out, imgspecv1.MediaTypeImageConfig, cfgBytes)
	if err != nil {
		return err
	}
	man := imgspecv1.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: imgspecv1.MediaTypeImageManifest,
		Config:    cfgDesc,
		Layers:    layers,
	}
	manBytes, err := json.Marshal(man)
	if err != nil {
		return err
	}
	manDesc, err := writeBlob(*out, imgspecv1.MediaTypeImageManifest, manBytes)
	if err != nil {
		return err
	}
	manDesc.Annotations = map[string]string{imgspecv1.AnnotationRefName: *tag}

	// Add to (or create) index.json, replacing any manifest with the same tag.
	index := imgspecv1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: imgspecv1.MediaTypeImageIndex}
	if b, err := os.ReadFile(filepath.Join(*out, imgspecv1.ImageIndexFile)); err == nil {
		if err := json.Unmarshal(b, &index); err != nil {
			return fmt.Errorf("parsing existing index.json: %w", err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	kept := index.Manifests[:0]
	for _, d := range index.Manifests {
		if d.Annotations[imgspecv1.AnnotationRefName] != *tag {
			kept = append(kept, d)
		}
	}
	index.Manifests = append(kept, manDesc)
	indexBytes, err := json.Marshal(index)
	if err != nil {
		return err
	}
	layoutBytes, err := json.Marshal(imgspecv1.ImageLayout{Version: imgspecv1.ImageLayoutVersion})
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(*out, imgspecv1.ImageLayoutFile), layoutBytes, 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(*out, imgspecv1.ImageIndexFile), indexBytes, 0o644); err != nil {
		return err
	}

	ids := make([]string, len(diffIDs))
	for i, d := range diffIDs {
		ids[i] = d.String()
	}
	return json.NewEncoder(os.Stdout).Encode(struct {
		DiffIDs        []string `json:"diffIDs"`
		ManifestDigest string   `json:"manifestDigest"`
	}{ids, manDesc.Digest.String()})
}

// layerTar returns an uncompressed tar with a directory and three files whose
// content is derived from (seed, layer index), so every layer differs.
func layerTar(seed uint64, layer, size int) ([]byte, error) {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[0:], seed)
	binary.LittleEndian.PutUint64(key[8:], uint64(layer))
	rng := rand.NewChaCha8(key)

	mtime := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	dir := fmt.Sprintf("layer%d/", layer)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: mtime, Format: tar.FormatPAX}); err != nil {
		return nil, err
	}
	sizes := []int{size / 2, size / 4, size - size/2 - size/4}
	for j, sz := range sizes {
		data := make([]byte, sz)
		if _, err := rng.Read(data); err != nil {
			return nil, err
		}
		hdr := &tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("%sfile%d.bin", dir, j), Mode: 0o644, Size: int64(sz), ModTime: mtime, Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func writeBlob(dir, mediaType string, data []byte) (imgspecv1.Descriptor, error) {
	d := digest.FromBytes(data)
	p := filepath.Join(dir, "blobs", d.Algorithm().String(), d.Encoded())
	if err := os.WriteFile(p, data, 0o644); err != nil {
		return imgspecv1.Descriptor{}, err
	}
	return imgspecv1.Descriptor{MediaType: mediaType, Digest: d, Size: int64(len(data))}, nil
}
