// The Z-Image diffusion transformer (ZImageTransformer2DModel): weights bound from a
// diffusers checkpoint and the forward pass, latent + timestep + caption → velocity.
// Spec §3 (architecture, keys §3.2, forward order §3.10). Shapes are written for the
// real model (D = 3840, 30 heads of 128, FFN 10240, adaLN input A = 256); the tiny test
// model uses the same code with D = 64.
//
// Ref: diffusers src/diffusers/models/transformers/transformer_z_image.py
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "io/weight_loader.h"
#include "io/weight_stream.h"

namespace zi {

// One transformer block. Prefix: noise_refiner.{i}. | context_refiner.{i}. | layers.{i}.
// Matrices are stored [out, in] in the load dtype; norm weights and biases are f32.
// The projections that read the same input are fused at load time (WeightLoader::
// load_matrix_rows: each file tensor written into its rows, LoRA deltas and overrides applied to
// it by its own name), so each runs as one GEMM: qkv = [to_q; to_k; to_v], w13 = [w1; w3].
// When the parts of one do not load in one dtype (a GGUF file mixing block formats, a LoRA on
// one part of a stored block format), that fused tensor is undefined and its parts are kept.
struct DitBlock {
  Tensor qkv;                  // attention.to_{q,k,v}.weight rows     [3·D, D]
  Tensor to_q, to_k, to_v;     //   unfused fallback                   [D, D] each
  Tensor to_out;               // attention.to_out.0.weight            [D, D]
  Tensor norm_q, norm_k;       // attention.norm_{q,k}.weight          [head_dim]
  Tensor attention_norm1;      // attention_norm1.weight               [D]
  Tensor attention_norm2;      // attention_norm2.weight               [D]
  Tensor ffn_norm1, ffn_norm2; // ffn_norm{1,2}.weight                 [D]
  Tensor w13;                  // feed_forward.w{1,3}.weight rows      [2·F, D]   (F = 10240)
  Tensor w1, w3;               //   unfused fallback                   [F, D] each
  Tensor w2;                   // feed_forward.w2.weight               [D, F]
  Tensor adaln_w;              // adaLN_modulation.0.weight            [4·D, A]; empty in context_refiner
  Tensor adaln_b;              // adaLN_modulation.0.bias              [4·D];    empty in context_refiner
  bool modulated() const { return adaln_w.defined(); }
};
// Every tensor of a block (what streams when the block does; add new members here).
std::vector<Tensor*> dit_block_tensors(DitBlock& b);

struct ZImageDit {
  DitConfig cfg;
  PhaseContext ctx;  // where it was loaded and computes (the WeightLoader's)
  Tensor x_embed_w, x_embed_b;          // all_x_embedder.2-1.{weight,bias}             [D, 64] / [D]
  Tensor t_mlp0_w, t_mlp0_b;            // t_embedder.mlp.0.{weight,bias}               [1024, 256] / [1024]
  Tensor t_mlp2_w, t_mlp2_b;            // t_embedder.mlp.2.{weight,bias}               [A, 1024] / [A]
  Tensor cap_norm;                      // cap_embedder.0.weight (RMSNorm)              [cap_feat_dim]
  Tensor cap_w, cap_b;                  // cap_embedder.1.{weight,bias}                 [D, cap_feat_dim] / [D]
  Tensor x_pad_token, cap_pad_token;    // x_pad_token, cap_pad_token                   [1, D]
  Tensor final_adaln_w, final_adaln_b;  // all_final_layer.2-1.adaLN_modulation.1.*     [D, A] / [D]
  Tensor final_w, final_b;              // all_final_layer.2-1.linear.{weight,bias}     [64, D] / [64]
  std::vector<DitBlock> noise_refiner;    // n_refiner_layers, modulated, image tokens only
  std::vector<DitBlock> context_refiner;  // n_refiner_layers, unmodulated, caption tokens only
  std::vector<DitBlock> layers;           // n_layers, modulated, unified [image; caption]
  // RoPE tables of the last geometry dit_forward saw, on the device it ran on: they depend on
  // sizes only, so every step of an image reuses them (recomputing them on the host each step
  // left the GPU idle for tens of milliseconds per step at 1024²). Freed with the model.
  struct RopeCache;
  mutable std::shared_ptr<RopeCache> rope_cache;
  // The denoise step recorded per geometry (dit_forward; GPU, ctx.cuda_graphs or
  // ZI_CUDA_GRAPHS=1): its recordings, their fixed buffers and the graph memory they hold.
  struct StepRecordings;
  mutable std::shared_ptr<StepRecordings> recordings;
  // The blocks the --vram plan streams (null: all resident). Block i: noise_refiner 0…,
  // context_refiner next, then layers; the forwards bracket each block with a BlockUse.
  std::shared_ptr<WeightStreamer> streamer;
};

struct ZImageControlNet;  // models/controlnet.h

// Sizes derived from the config exactly as the reference derives them.
int dit_ffn_hidden(const DitConfig& cfg);  // int(dim / 3 * 8) in floating point: 10240 (tiny: 170)
int dit_adaln_dim(const DitConfig& cfg);   // min(dim, 256)
// FFN rows per chunk in a phase: ctx.ffn_chunk_rows, else 1024 on the CPU (bounds the hidden),
// 0 (the whole sequence) on the GPU.
int64_t dit_ffn_chunk_rows(const PhaseContext& ctx);

// Binds every key of spec §3.2 through `loader`: matrices in `wdt` (bf16/f16/f32), norms,
// biases and pad tokens in f32. The caller calls loader.finish(), which reports missing,
// wrong-shape and unexpected tensors all at once.
ZImageDit load_zimage_dit(WeightLoader& loader, const DitConfig& cfg, DType wdt);

// One block's keys under `prefix` (e.g. "layers.3."); used by the ControlNet's blocks too.
DitBlock load_dit_block(WeightLoader& loader, const std::string& prefix, const DitConfig& cfg, DType wdt, bool modulated);

// One item: latent [C, 1, Hl, Wl] f32, t = 1 − σ (the model multiplies by t_scale),
// cap_feats [L, cap_feat_dim] f32 → velocity [C, 1, Hl, Wl] f32 (≈ x₀ − ε, spec §3.11).
Tensor dit_forward(const ZImageDit& m, const Tensor& latent, float t, const Tensor& cap_feats);

// Recorded steps (issue 19): whether dit_forward records and replays its device work (the GPU,
// no streamed blocks, ctx.cuda_graphs or else ZI_CUDA_GRAPHS=1; off by default until measured);
// how many forwards were replays; why recording failed ("" if it did not; the forwards then run
// eagerly). dit_release_recordings frees the recordings and their graph memory (the end of a
// denoise phase whose model stays loaded); the next forward records again.
bool dit_records_steps(const ZImageDit& m);
int64_t dit_step_replays(const ZImageDit& m);
std::string dit_recording_failure(const ZImageDit& m);
void dit_release_recordings(const ZImageDit& m);

// dit_forward with a Fun ControlNet Union (ZImageControlNetPipeline / ZImageControlNetModel):
// control [control_in_dim, 1, Hl, Wl] f32, the control context (condition latents, and for
// inpainting the mask and masked-image latents); its hints, times `scale`, are added to the
// unified stream after the transformer layers of control_layers_places.
Tensor dit_forward_control(const ZImageDit& m, const Tensor& latent, float t, const Tensor& cap_feats,
                           const ZImageControlNet& cn, const Tensor& control, float scale);

// Several items with different caption lengths. Equal to calling dit_forward on each item
// (the reference's batched call masks batch padding only, so items never interact). Stacked:
// items of one timestep and one latent size have their token rows go through every linear layer
// as one GEMM, and attention runs per item; equal to dit_forward's result up to the GEMMs'
// summation order, which may depend on the row count (OpenBLAS's sgemm does outside its
// small-matrix path). Auto stacks on the GPU, where it raises throughput, and runs the items one
// after another on the CPU, where it would not, so that a CPU batch is bit-identical to single
// runs (a server's batch against the CLI's image).
enum class BatchMode { Auto, Stacked, OneByOne };
std::vector<Tensor> dit_forward_batch(const ZImageDit& m, const std::vector<Tensor>& latents,
                                      const std::vector<float>& t, const std::vector<Tensor>& caps,
                                      BatchMode mode = BatchMode::Auto);

}  // namespace zi
