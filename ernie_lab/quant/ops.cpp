// The decode kernels of gemv.c registered with PyTorch's dispatcher from C++: ernie_lab::linear, ::gemv and
// ::int8_int4, the three operators a compiled decode step calls once per linear layer and token.
//
// ops.py defines the same operators in Python (torch.library.custom_op around the ctypes calls of
// native.py). That costs about 11 us of Python dispatch per call on top of the kernel: 127 calls a token at
// the 0.3B shape, most of what is left of its compiled per-token overhead. Registered here, a call is the
// dispatcher's C++ lookup, a few checks and the kernel. ops.py builds this file (with gemv.c, on first use,
// like native.py builds gemv.c alone) and loads it with torch.ops.load_library; where it does not build,
// the Python operators stand in, with the same names and schemas. The checks are native.py's: the C trusts
// its pointers, so anything but the documented layout is refused before the call.
//
//   linear(x, weight, bias, out_dtype)                                  (M, K) @ fp32 / bf16 (N, K)
//   gemv(x, qweight, scales, zeros, bits, group_size, bias, out_dtype)    (M, K) @ int8 / int4 / int2 codes
//   int8_int4(x, qweight, scales, zeros, group_size, bias, out_dtype)     (M, K) rounded to int8 blocks @ int4

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

extern "C" void ernie_linear(int kind, const void *x, int x_bf16, const void *w, const float *scales,
                             const uint8_t *zeros, const float *bias, void *y, int y_bf16, int64_t M, int64_t N,
                             int64_t K, int64_t G, int threads);

namespace {

constexpr int64_t kMaxGroup = 2048;   // native.MAX_GROUP
constexpr int64_t kBlock = 32;        // native.BLOCK
constexpr int kW4A8 = 48;             // native.W4A8_KIND

const void *address(const std::optional<at::Tensor> &t) { return t ? t->data_ptr() : nullptr; }

// (M, K) contiguous fp32 or bf16 rows, as native._rows
at::Tensor rows(const at::Tensor &x, int64_t K) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.device().is_cpu(), "ernie_lab: rows of shape ", x.sizes(),
                " on ", x.device(), " for a layer of ", K, " inputs");
    const bool readable = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
    return (readable ? x : x.to(at::kFloat)).contiguous();
}

// int8 or packed codes, float32 scales, uint8 zeros, as native._check_codes; returns (N, K)
std::pair<int64_t, int64_t> check_codes(const at::Tensor &q, const at::Tensor &scales,
                                        const std::optional<at::Tensor> &zeros, int64_t bits, int64_t group) {
    TORCH_CHECK(q.dim() == 2 && (bits == 8 || bits == 4 || bits == 2), "ernie_lab: codes must be 2-D of 8, 4 or 2 bits");
    const int64_t N = q.size(0), K = q.size(1) * 8 / bits;
    TORCH_CHECK(bits == 8 || (group > 0 && K % group == 0), "ernie_lab: group_size ", group, " must divide K = ", K);
    const int64_t groups = bits == 8 ? 1 : K / group;
    const bool ok = q.scalar_type() == (bits == 8 ? at::kChar : at::kByte) && q.is_contiguous() && q.device().is_cpu()
        && scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N * groups
        && (!zeros || (zeros->scalar_type() == at::kByte && zeros->is_contiguous() && zeros->numel() == N * groups));
    TORCH_CHECK(ok, "ernie_lab: the kernels want contiguous CPU codes (N, K*bits/8), float32 scales and uint8 zeros "
                "of (N, K/group); got ", q.scalar_type(), " ", q.sizes(), ", ", scales.scalar_type(), " ", scales.sizes());
    return {N, K};
}

// y (M, N) = rows @ W^T (+ bias), in fp32 or bf16 (any other out_dtype: fp32), as native._run
at::Tensor run(int kind, const at::Tensor &x, const at::Tensor &weight, const at::Tensor *scales,
               const std::optional<at::Tensor> &zeros, const std::optional<at::Tensor> &bias,
               at::ScalarType out_dtype, int64_t N, int64_t K, int64_t group) {
    const at::Tensor r = rows(x, K);
    const at::ScalarType written = out_dtype == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
    at::Tensor y = at::empty({r.size(0), N}, r.options().dtype(written));
    std::optional<at::Tensor> b;
    if (bias) {
        TORCH_CHECK(bias->numel() == N, "ernie_lab: a bias of ", bias->numel(), " values for ", N, " outputs");
        b = bias->detach().to(at::kFloat).contiguous();
    }
    ernie_linear(kind, r.data_ptr(), r.scalar_type() == at::kBFloat16, weight.data_ptr(),
                 scales ? scales->data_ptr<float>() : nullptr, static_cast<const uint8_t *>(address(zeros)),
                 static_cast<const float *>(address(b)), y.data_ptr(), written == at::kBFloat16, r.size(0), N, K,
                 group, at::get_num_threads());
    return y;
}

at::Tensor linear(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &bias,
                  at::ScalarType out_dtype) {
    TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu()
                && (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
                "ernie_lab::linear takes a 2-D fp32 or bf16 CPU weight, not ", weight.scalar_type());
    const at::Tensor w = weight.contiguous();
    const int64_t N = w.size(0), K = w.size(1);
    return run(w.scalar_type() == at::kBFloat16 ? 16 : 32, x, w, nullptr, std::nullopt, bias, out_dtype, N, K, K);
}

at::Tensor gemv(const at::Tensor &x, const at::Tensor &qweight, const at::Tensor &scales,
                const std::optional<at::Tensor> &zeros, int64_t bits, int64_t group_size,
                const std::optional<at::Tensor> &bias, at::ScalarType out_dtype) {
    const auto [N, K] = check_codes(qweight, scales, zeros, bits, group_size);
    TORCH_CHECK(bits == 8 || group_size <= kMaxGroup, "ernie_lab::gemv sums a group exactly in int32 only up to ",
                kMaxGroup, " inputs, not ", group_size);
    return run(static_cast<int>(bits), x, qweight, &scales, zeros, bias, out_dtype, N, K, group_size);
}

at::Tensor int8_int4(const at::Tensor &x, const at::Tensor &qweight, const at::Tensor &scales,
                     const std::optional<at::Tensor> &zeros, int64_t group_size,
                     const std::optional<at::Tensor> &bias, at::ScalarType out_dtype) {
    const auto [N, K] = check_codes(qweight, scales, zeros, 4, group_size);
    TORCH_CHECK(K % kBlock == 0 && group_size % kBlock == 0, "ernie_lab::int8_int4 wants K (", K,
                ") and group_size (", group_size, ") multiples of ", kBlock);
    return run(kW4A8, x, qweight, &scales, zeros, bias, out_dtype, N, K, group_size);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ernie_lab, m) {
    m.def("linear(Tensor x, Tensor weight, Tensor? bias, ScalarType out_dtype) -> Tensor");
    m.def("gemv(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, SymInt bits, SymInt group_size, Tensor? bias, "
          "ScalarType out_dtype) -> Tensor");
    m.def("int8_int4(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, SymInt group_size, Tensor? bias, "
          "ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(ernie_lab, CPU, m) {
    m.impl("linear", &linear);
    m.impl("gemv", &gemv);
    m.impl("int8_int4", &int8_int4);
}
