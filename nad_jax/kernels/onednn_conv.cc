// oneDNN convolutions (NHWC activations, HWIO kernels; float32, or bfloat16 where the CPU
// computes it natively) as XLA FFI handlers: the forward pass, the input gradient and the
// kernel gradient. Built and loaded by nad_jax/kernels/onednn.py. A oneDNN error or an
// unsupported element type comes back as an XLA error, not a crash.
#include <cstdint>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Strides and paddings, as the FFI attributes pass them.
struct Attributes {
  int64_t sh, sw, pt, pb, pl, pr;
};

// oneDNN's logical dims (N, C, H, W) / (O, I, H, W) of x: NHWC, w: HWIO, y: NHWC, and the
// element type every operand shares.
struct Geometry {
  memory::dims src, weights, dst, strides, pad_l, pad_r;
  dt type;
};

Geometry Shapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                ffi::Span<const int64_t> y, dt type, const Attributes& a) {
  Geometry g;
  g.src = {x[0], x[3], x[1], x[2]};
  g.weights = {w[3], w[2], w[0], w[1]};
  g.dst = {y[0], y[3], y[1], y[2]};
  g.strides = {a.sh, a.sw};
  g.pad_l = {a.pt, a.pl};
  g.pad_r = {a.pb, a.pr};
  g.type = type;
  return g;
}

memory::desc Nhwc(const Geometry& g, const memory::dims& dims) {
  return memory::desc(dims, g.type, tag::nhwc);
}

memory::desc AnyWeights(const Geometry& g) {
  return memory::desc(g.weights, g.type, tag::any);
}

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Nhwc(g, g.src), AnyWeights(g), Nhwc(g, g.dst), g.strides, g.pad_l, g.pad_r);
}

memory Plain(const Geometry& g, const memory::dims& dims, tag t, void* data) {
  return memory(memory::desc(dims, g.type, t), Engine(), data);
}

// Weights in the layout the primitive picks (format `any`): a reorder from HWIO when it
// differs; kernels are small, activations stay in place as NHWC.
memory WeightsFor(const memory::desc& wanted, memory& hwio, dnnl::stream& s) {
  if (wanted == hwio.get_desc()) return hwio;
  memory out(wanted, Engine());
  dnnl::reorder(hwio, out).execute(s, hwio, out);
  return out;
}

void Forward(const Geometry& g, void* x, void* w, void* y) {
  auto pd = ForwardPd(g);
  dnnl::stream s(Engine());
  memory hwio = Plain(g, g.weights, tag::hwio, w);
  memory weights = WeightsFor(pd.weights_desc(), hwio, s);
  dnnl::convolution_forward(pd).execute(
      s, {{DNNL_ARG_SRC, Plain(g, g.src, tag::nhwc, x)},
          {DNNL_ARG_WEIGHTS, weights},
          {DNNL_ARG_DST, Plain(g, g.dst, tag::nhwc, y)}});
  s.wait();
}

void BackwardData(const Geometry& g, void* dy, void* w, void* dx) {
  auto pd = dnnl::convolution_backward_data::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, Nhwc(g, g.src), AnyWeights(g),
      Nhwc(g, g.dst), g.strides, g.pad_l, g.pad_r, ForwardPd(g));
  dnnl::stream s(Engine());
  memory hwio = Plain(g, g.weights, tag::hwio, w);
  memory weights = WeightsFor(pd.weights_desc(), hwio, s);
  dnnl::convolution_backward_data(pd).execute(
      s, {{DNNL_ARG_DIFF_DST, Plain(g, g.dst, tag::nhwc, dy)},
          {DNNL_ARG_WEIGHTS, weights},
          {DNNL_ARG_DIFF_SRC, Plain(g, g.src, tag::nhwc, dx)}});
  s.wait();
}

void BackwardWeights(const Geometry& g, void* x, void* dy, void* dw) {
  auto pd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, Nhwc(g, g.src), AnyWeights(g),
      Nhwc(g, g.dst), g.strides, g.pad_l, g.pad_r, ForwardPd(g));
  dnnl::stream s(Engine());
  memory hwio = Plain(g, g.weights, tag::hwio, dw);
  bool direct = pd.diff_weights_desc() == hwio.get_desc();
  memory diff = direct ? hwio : memory(pd.diff_weights_desc(), Engine());
  dnnl::convolution_backward_weights(pd).execute(
      s, {{DNNL_ARG_SRC, Plain(g, g.src, tag::nhwc, x)},
          {DNNL_ARG_DIFF_DST, Plain(g, g.dst, tag::nhwc, dy)},
          {DNNL_ARG_DIFF_WEIGHTS, diff}});
  if (!direct) dnnl::reorder(diff, hwio).execute(s, diff, hwio);
  s.wait();
}

// The FFI entry points: two operands and one result of one element type (F32 or BF16),
// strides and paddings. `role` says which of (a, b, out) hold x, w and y or their gradients.
enum class Role { kForward, kBackwardData, kBackwardWeights };

template <Role role, void (*Kernel)(const Geometry&, void*, void*, void*)>
ffi::Error Call(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  ffi::DataType type = a.element_type();
  if (b.element_type() != type || out->element_type() != type ||
      (type != ffi::DataType::F32 && type != ffi::DataType::BF16)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "oneDNN convolution: operands must all be float32 or all bfloat16");
  }
  Attributes attributes{sh, sw, pt, pb, pl, pr};
  dt dnnl_type = type == ffi::DataType::F32 ? dt::f32 : dt::bf16;
  try {
    if constexpr (role == Role::kForward) {  // a = x, b = w, out = y
      Kernel(Shapes(a.dimensions(), b.dimensions(), out->dimensions(), dnnl_type, attributes),
             a.untyped_data(), b.untyped_data(), out->untyped_data());
    } else if constexpr (role == Role::kBackwardData) {  // a = dy, b = w, out = dx
      Kernel(Shapes(out->dimensions(), b.dimensions(), a.dimensions(), dnnl_type, attributes),
             a.untyped_data(), b.untyped_data(), out->untyped_data());
    } else {  // a = x, b = dy, out = dw
      Kernel(Shapes(a.dimensions(), out->dimensions(), b.dimensions(), dnnl_type, attributes),
             a.untyped_data(), b.untyped_data(), out->untyped_data());
    }
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

// 1 where this CPU computes bfloat16 natively (oneDNN's effective ISA includes AVX512-BF16,
// as AMX ones do, or AVX2-VNNI-2; plain AVX-512 only emulates it) and oneDNN runs bfloat16
// convolutions and both their gradients there with an optimised, not reference,
// implementation; else 0.
extern "C" int NadOnednnHasBf16() {
  auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  auto includes = [isa](dnnl_cpu_isa_t wanted) { return (isa & wanted) == wanted; };
  if (!includes(dnnl_cpu_isa_avx512_core_bf16) && !includes(dnnl_cpu_isa_avx2_vnni_2)) return 0;
  Geometry g{{2, 16, 8, 8}, {16, 16, 3, 3}, {2, 16, 8, 8}, {1, 1}, {1, 1}, {1, 1}, dt::bf16};
  auto native = [](const std::string& impl) { return impl.rfind("ref", 0) != 0; };
  try {
    auto forward = ForwardPd(g);
    auto data = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, Nhwc(g, g.src), AnyWeights(g),
        Nhwc(g, g.dst), g.strides, g.pad_l, g.pad_r, forward);
    auto weights = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, Nhwc(g, g.src), AnyWeights(g),
        Nhwc(g, g.dst), g.strides, g.pad_l, g.pad_r, forward);
    return native(forward.impl_info_str()) && native(data.impl_info_str()) &&
           native(weights.impl_info_str());
  } catch (const dnnl::error&) {
    return 0;
  }
}

#define CONV_BINDING                                                                     \
  ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()                           \
      .Ret<ffi::AnyBuffer>().Attr<int64_t>("sh").Attr<int64_t>("sw")                     \
      .Attr<int64_t>("pt").Attr<int64_t>("pb").Attr<int64_t>("pl").Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(NadOnednnConvForward, (Call<Role::kForward, Forward>),
                              CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(NadOnednnConvBackwardData,
                              (Call<Role::kBackwardData, BackwardData>), CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(NadOnednnConvBackwardWeights,
                              (Call<Role::kBackwardWeights, BackwardWeights>), CONV_BINDING);
