// oneDNN convolutions (NHWC activations, HWIO kernels, float32) as XLA FFI handlers:
// the forward pass, the input gradient and the kernel gradient. Built and loaded by
// nad_jax/kernels/onednn.py. A oneDNN error comes back as an XLA error, not a crash.
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

struct Geometry {
  memory::dims src, weights, dst, strides, pad_l, pad_r;
};

// oneDNN's logical dims (N, C, H, W) / (O, I, H, W) of x: NHWC, w: HWIO, y: NHWC.
struct Attributes {
  int64_t sh, sw, pt, pb, pl, pr;
};

Geometry Shapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                ffi::Span<const int64_t> y, const Attributes& a) {
  Geometry g;
  g.src = {x[0], x[3], x[1], x[2]};
  g.weights = {w[3], w[2], w[0], w[1]};
  g.dst = {y[0], y[3], y[1], y[2]};
  g.strides = {a.sh, a.sw};
  g.pad_l = {a.pt, a.pl};
  g.pad_r = {a.pb, a.pr};
  return g;
}

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      memory::desc(g.src, dt::f32, tag::nhwc), memory::desc(g.weights, dt::f32, tag::any),
      memory::desc(g.dst, dt::f32, tag::nhwc), g.strides, g.pad_l, g.pad_r);
}

memory Plain(const memory::dims& dims, tag t, void* data) {
  return memory(memory::desc(dims, dt::f32, t), Engine(), data);
}

// Weights in the layout the primitive picks (format `any`): a reorder from HWIO when it
// differs; kernels are small, activations stay in place as NHWC.
memory WeightsFor(const memory::desc& wanted, memory& hwio, dnnl::stream& s) {
  if (wanted == hwio.get_desc()) return hwio;
  memory out(wanted, Engine());
  dnnl::reorder(hwio, out).execute(s, hwio, out);
  return out;
}

void Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
             const Attributes& a) {
  Geometry g = Shapes(x.dimensions(), w.dimensions(), y->dimensions(), a);
  auto pd = ForwardPd(g);
  dnnl::stream s(Engine());
  memory hwio = Plain(g.weights, tag::hwio, w.typed_data());
  memory weights = WeightsFor(pd.weights_desc(), hwio, s);
  dnnl::convolution_forward(pd).execute(
      s, {{DNNL_ARG_SRC, Plain(g.src, tag::nhwc, x.typed_data())},
          {DNNL_ARG_WEIGHTS, weights},
          {DNNL_ARG_DST, Plain(g.dst, tag::nhwc, y->typed_data())}});
  s.wait();
}

void BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> dx, const Attributes& a) {
  Geometry g = Shapes(dx->dimensions(), w.dimensions(), dy.dimensions(), a);
  auto pd = dnnl::convolution_backward_data::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, memory::desc(g.src, dt::f32, tag::nhwc),
      memory::desc(g.weights, dt::f32, tag::any), memory::desc(g.dst, dt::f32, tag::nhwc),
      g.strides, g.pad_l, g.pad_r, ForwardPd(g));
  dnnl::stream s(Engine());
  memory hwio = Plain(g.weights, tag::hwio, w.typed_data());
  memory weights = WeightsFor(pd.weights_desc(), hwio, s);
  dnnl::convolution_backward_data(pd).execute(
      s, {{DNNL_ARG_DIFF_DST, Plain(g.dst, tag::nhwc, dy.typed_data())},
          {DNNL_ARG_WEIGHTS, weights},
          {DNNL_ARG_DIFF_SRC, Plain(g.src, tag::nhwc, dx->typed_data())}});
  s.wait();
}

void BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                     ffi::ResultBuffer<ffi::F32> dw, const Attributes& a) {
  Geometry g = Shapes(x.dimensions(), dw->dimensions(), dy.dimensions(), a);
  auto pd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, memory::desc(g.src, dt::f32, tag::nhwc),
      memory::desc(g.weights, dt::f32, tag::any), memory::desc(g.dst, dt::f32, tag::nhwc),
      g.strides, g.pad_l, g.pad_r, ForwardPd(g));
  dnnl::stream s(Engine());
  memory hwio = Plain(g.weights, tag::hwio, dw->typed_data());
  bool direct = pd.diff_weights_desc() == hwio.get_desc();
  memory diff = direct ? hwio : memory(pd.diff_weights_desc(), Engine());
  dnnl::convolution_backward_weights(pd).execute(
      s, {{DNNL_ARG_SRC, Plain(g.src, tag::nhwc, x.typed_data())},
          {DNNL_ARG_DIFF_DST, Plain(g.dst, tag::nhwc, dy.typed_data())},
          {DNNL_ARG_DIFF_WEIGHTS, diff}});
  if (!direct) dnnl::reorder(diff, hwio).execute(s, diff, hwio);
  s.wait();
}

// The FFI entry points: two float32 operands, one result, strides and paddings.
template <void (*Kernel)(ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                         ffi::ResultBuffer<ffi::F32>, const Attributes&)>
ffi::Error Call(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                ffi::ResultBuffer<ffi::F32> out, int64_t sh, int64_t sw, int64_t pt,
                int64_t pb, int64_t pl, int64_t pr) {
  try {
    Kernel(a, b, out, Attributes{sh, sw, pt, pb, pl, pr});
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

#define CONV_BINDING                                                                     \
  ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()             \
      .Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>("sh").Attr<int64_t>("sw")              \
      .Attr<int64_t>("pt").Attr<int64_t>("pb").Attr<int64_t>("pl").Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(NadOnednnConvForward, Call<Forward>, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(NadOnednnConvBackwardData, Call<BackwardData>, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(NadOnednnConvBackwardWeights, Call<BackwardWeights>,
                              CONV_BINDING);
