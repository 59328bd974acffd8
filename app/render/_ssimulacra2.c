/*
 * SSIMULACRA2, compiled: what q=auto scores every candidate with (app/render/ssimulacra2.py is
 * the Python face of it).
 *
 * The formula and its quirks are those of the `ssimulacra2` package on PyPI (0.3.0, a NumPy and
 * SciPy port of libjxl's tool), which the shared quality bench scores with, so the scores agree
 * with it (BENCHMARKS.md, "q=auto: the metric"):
 * - the Gaussian (sigma 1.5, 11 taps) meets zeros past the left and right edges and a
 *   half-sample mirror past the top and bottom (the package blurs transposed planes);
 * - the 2x2 downsampling averages what is there at an odd edge;
 * - an image with fewer than six scales of at least 8x8 pixels takes the weights in the order of
 *   the loop.
 * It runs on float32 planes, with sums in double, streaming: each output row of the blurs is
 * made, compared and summed before the next, so no plane but the reference's is ever written
 * (see blur rows below), and without the GIL.
 *
 * A Reference keeps, per scale, the reference's XYB planes and what every candidate is compared
 * with (their blur and local variance: 36 bytes a pixel, 48 over all scales), so scoring a
 * candidate costs three blurs per plane and 15 bytes a pixel of working memory.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#define NUM_SCALES 6
#define RADIUS 5
#define TAPS (2 * RADIUS + 1)
#define MIN_SIDE 8
/* The loops that take the time, compiled twice on x86-64: for AVX2 (x86-64-v3; 1.3x faster
 * here) and for the baseline, chosen when the module loads (GCC's function multiversioning). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HOT
#endif

/* max(x, 0), exact in float and branch-free: GCC turns a ?: max into a branch unless told to
 * ignore NaNs and signed zeros, and a branch keeps a loop from being vectorised. */
#define POSITIVE_PART(x) (((x) + fabsf(x)) * 0.5f)

static float taps[TAPS];
static float linear_of[256];

static const float opsin[3][3] = {
    {0.30f, 0.622f, 0.078f},
    {0.23f, 0.692f, 0.078f},
    {0.24342268924547819f, 0.20476744424496821f, 0.5518098665095536f},
};
static const double bias_d = 0.0037930732552754493;
static float bias, cbrt_bias;
static const float c2 = 0.0009f;

static const double weights[108] = {
    0.0, 0.0007376606707406586, 0.0, 0.0, 0.0007793481682867309, 0.0, 0.0, 0.0004371155730107379, 0.0,
    1.1041726426657346, 0.00066284834129271, 0.00015231632783718752, 0.0, 0.0016406437456599754, 0.0,
    1.8422455520539298, 11.441172603757666, 0.0, 0.0007989109436015163, 0.000176816438078653, 0.0,
    1.8787594979546387, 10.94906990605142, 0.0, 0.0007289346991508072, 0.9677937080626833, 0.0,
    0.00014003424285435884, 0.9981766977854967, 0.00031949755934435053, 0.0004550992113792063, 0.0, 0.0,
    0.0013648766163243398, 0.0, 0.0, 0.0, 0.0, 0.0, 7.466890328078848, 0.0, 17.445833984131262,
    0.0006235601634041466, 0.0, 0.0, 6.683678146179332, 0.00037724407979611296, 1.027889937768264,
    225.20515300849274, 0.0, 0.0, 19.213238186143016, 0.0011401524586618361, 0.001237755635509985,
    176.39317598450694, 0.0, 0.0, 24.43300999870476, 0.28520802612117757, 0.0004485436923833408, 0.0, 0.0,
    0.0, 34.77906344483772, 44.835625328877896, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
    0.0008680556573291698, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0005313191874358747, 0.0, 0.00016533814161379112,
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0004179171803251336, 0.0017290828234722833, 0.0, 0.0020827005846636437,
    0.0, 0.0, 8.826982764996862, 23.19243343998926, 0.0, 95.1080498811086, 0.9863978034400682,
    0.9834382792465353, 0.0012286405048278493, 171.2667255897307, 0.9807858872435379, 0.0, 0.0, 0.0,
    0.0005130064588990679, 0.0, 0.00010854057858411537,
};

static void init_tables(void) {
    double sum = 0.0, t[TAPS];
    for (int i = 0; i < TAPS; i++) {
        double x = (double)(i - RADIUS) / 1.5;
        t[i] = exp(-0.5 * x * x);
        sum += t[i];
    }
    for (int i = 0; i < TAPS; i++) taps[i] = (float)(t[i] / sum);
    for (int i = 0; i < 256; i++) {
        double v = i / 255.0;
        linear_of[i] = (float)(v <= 0.04045 ? v / 12.92 : pow((v + 0.055) / 1.055, 2.4));
    }
    bias = (float)bias_d;
    cbrt_bias = (float)cbrt(bias_d);
}

/* Cube root of a positive float (XYB's inputs are at least `bias`): a bit-level first guess
 * (within 3 %) and two of Halley's steps (cubic: 1e-5, then float's own precision), which the
 * compiler vectorises where libm's cbrtf is a call per value. */
static inline float cbrt_positive(float x) {
    union { float f; uint32_t i; } u = {x};
    u.i = u.i / 3 + 0x2a5137a0u;
    float y = u.f, y3;
    y3 = y * y * y;
    y = y * (y3 + 2.0f * x) / (2.0f * y3 + x);
    y3 = y * y * y;
    y = y * (y3 + 2.0f * x) / (2.0f * y3 + x);
    return y;
}

/* Linear RGB -> the positive XYB the metric works in, one pixel. Linear light is never negative
 * and the mix has no negative weight, so every m is at least `bias`: the reference's clamp at 0
 * never acts, and the cube root's argument is positive. */
static inline void xyb_of(float r, float g, float b, float *x, float *yy, float *bb) {
    float m0 = opsin[0][0] * r + opsin[0][1] * g + opsin[0][2] * b + bias;
    float m1 = opsin[1][0] * r + opsin[1][1] * g + opsin[1][2] * b + bias;
    float m2 = opsin[2][0] * r + opsin[2][1] * g + opsin[2][2] * b + bias;
    m0 = cbrt_positive(m0) - cbrt_bias;
    m1 = cbrt_positive(m1) - cbrt_bias;
    m2 = cbrt_positive(m2) - cbrt_bias;
    float y = (m0 + m1) * 0.5f;
    *x = (m0 - m1) * 7.0f + 0.42f;
    *yy = y + 0.01f;
    *bb = (m2 - y) + 0.55f;
}

/* Scale 0: packed RGB bytes -> XYB planes, and the next scale's linear planes (the 2x2 average of
 * the linear values; an odd edge averages what it has), so that no full-size linear plane is
 * ever stored. */
HOT static void first_scale(const unsigned char *restrict rgb, int h, int w, float *const xyb[3],
                            float *const half[3]) {
    for (size_t i = 0, n = (size_t)h * w; i < n; i++)
        xyb_of(linear_of[rgb[3 * i]], linear_of[rgb[3 * i + 1]], linear_of[rgb[3 * i + 2]], &xyb[0][i],
               &xyb[1][i], &xyb[2][i]);
    if (!half) return;
    int oh = (h + 1) / 2, ow = (w + 1) / 2;
    for (int y = 0; y < oh; y++) {
        const unsigned char *r0 = rgb + (size_t)(2 * y) * w * 3;
        const unsigned char *r1 = rgb + (size_t)(2 * y + 1 < h ? 2 * y + 1 : 2 * y) * w * 3;
        for (int x = 0; x < ow; x++) {
            int x0 = 2 * x * 3, x1 = (2 * x + 1 < w ? 2 * x + 1 : 2 * x) * 3;
            for (int c = 0; c < 3; c++)
                half[c][(size_t)y * ow + x] =
                    (linear_of[r0[x0 + c]] + linear_of[r1[x0 + c]] + linear_of[r0[x1 + c]] + linear_of[r1[x1 + c]]) *
                    0.25f;
        }
    }
}

/* Later scales: linear planes -> XYB planes. */
HOT static void to_xyb(float *const lin[3], float *const out[3], size_t n) {
    const float *restrict r = lin[0], *restrict g = lin[1], *restrict b = lin[2];
    float *restrict x = out[0], *restrict yy = out[1], *restrict bb = out[2];
#pragma omp simd
    for (size_t i = 0; i < n; i++) xyb_of(r[i], g[i], b[i], &x[i], &yy[i], &bb[i]);
}

/* 2x2 box average of h x w planes, in place (an output element never lies past the inputs it
 * is made of); an odd edge averages what it has. */
static void downsample(float *const planes[3], int h, int w) {
    int oh = (h + 1) / 2, ow = (w + 1) / 2;
    for (int c = 0; c < 3; c++) {
        for (int y = 0; y < oh; y++) {
            const float *r0 = planes[c] + (size_t)(2 * y) * w;
            const float *r1 = planes[c] + (size_t)(2 * y + 1 < h ? 2 * y + 1 : 2 * y) * w;
            float *dst = planes[c] + (size_t)y * ow;
            for (int x = 0; x < ow; x++) {
                int x0 = 2 * x, x1 = 2 * x + 1 < w ? 2 * x + 1 : 2 * x;
                dst[x] = (r0[x0] + r1[x0] + r0[x1] + r1[x1]) * 0.25f;
            }
        }
    }
}

/* A row index past the top or bottom, mirrored the way scipy's "reflect" does (the edge row
 * repeats). Planes are at least MIN_SIDE > RADIUS rows tall, so one reflection suffices. */
static inline int mirror(int y, int h) {
    if (y < 0) return -y - 1;
    if (y >= h) return 2 * h - y - 1;
    return y;
}

/* The blur, one output row at a time. The vertical pass sums the 11 rows around it (mirrored at
 * the top and bottom) into a row padded with zeros, which the horizontal pass then reads; the
 * squares and products the variances blur are made once per input row into a ring of the 11 rows
 * in reach. Nothing but the planes the reference keeps is written to memory: a 1920 px image's
 * planes are far larger than the caches, and writing and re-reading whole planes of blurs and
 * products cost more than the arithmetic. */
static inline void vertical(const float *const rows[TAPS], float *restrict dst, int w) {
    const float t0 = taps[0], t1 = taps[1], t2 = taps[2], t3 = taps[3], t4 = taps[4], t5 = taps[5];
#pragma omp simd
    for (int x = 0; x < w; x++)
        dst[x] = rows[5][x] * t5 + (rows[0][x] + rows[10][x]) * t0 + (rows[1][x] + rows[9][x]) * t1 +
                 (rows[2][x] + rows[8][x]) * t2 + (rows[3][x] + rows[7][x]) * t3 + (rows[4][x] + rows[6][x]) * t4;
}

/* `padded` holds w values after RADIUS zeros, and RADIUS zeros after them. */
static inline void horizontal(const float *restrict padded, float *restrict dst, int w) {
    for (int x = 0; x < w; x++) dst[x] = padded[x + RADIUS] * taps[RADIUS];
    for (int k = 0; k < RADIUS; k++) {
        const float t = taps[k];
        const float *left = padded + k, *right = padded + 2 * RADIUS - k;
        for (int x = 0; x < w; x++) dst[x] += (left[x] + right[x]) * t;
    }
}

/* Floats of row scratch a plane of width w needs: 3 padded rows, a ring of 11 rows for each of
 * 2 products, and 3 output rows. */
static size_t row_floats(int w) { return 3 * ((size_t)w + 2 * RADIUS) + 2 * TAPS * (size_t)w + 3 * (size_t)w; }

typedef struct {
    float *padded[3], *ring[2], *out[3];
    int w;
} Rows;

static void rows_layout(Rows *rows, float *base, int w) {
    rows->w = w;
    for (int i = 0; i < 3; i++) {
        rows->padded[i] = base;
        memset(base, 0, RADIUS * sizeof(float));
        memset(base + RADIUS + w, 0, RADIUS * sizeof(float));
        base += w + 2 * RADIUS;
    }
    for (int i = 0; i < 2; i++, base += TAPS * (size_t)w) rows->ring[i] = base;
    for (int i = 0; i < 3; i++, base += w) rows->out[i] = base;
}

/* One reference plane of one scale: its blur `mu` and local variance `sigma`. */
HOT static void prepare_plane(const float *img, float *mu, float *sigma, int h, int w, Rows *rows) {
    float *square = rows->ring[0];
    int ready = 0; /* rows of the ring made so far */
    for (int y = 0; y < h; y++) {
        for (; ready < h && ready <= y + RADIUS; ready++) {
            const float *src = img + (size_t)ready * w;
            float *dst = square + (size_t)(ready % TAPS) * w;
            for (int x = 0; x < w; x++) dst[x] = src[x] * src[x];
        }
        const float *around[TAPS], *around_sq[TAPS];
        for (int i = 0; i < TAPS; i++) {
            int src = mirror(y + i - RADIUS, h);
            around[i] = img + (size_t)src * w;
            around_sq[i] = square + (size_t)(src % TAPS) * w;
        }
        vertical(around, rows->padded[0] + RADIUS, w);
        vertical(around_sq, rows->padded[1] + RADIUS, w);
        float *m = mu + (size_t)y * w, *v = sigma + (size_t)y * w;
        horizontal(rows->padded[0], m, w);
        horizontal(rows->padded[1], v, w);
        for (int x = 0; x < w; x++) v[x] -= m[x] * m[x];
    }
}

/* The mean and the 4th root of the mean 4th power, summed. */
typedef struct {
    double sum, sum4;
} Norm;

/* One plane of one scale of a candidate against the reference's: the SSIM error map and the
 * detail ratio, row by row, into their norms: float sums over a row (vectorised), double across
 * rows. */
HOT static void compare_plane(const float *img1, const float *mu1, const float *sigma1, const float *img2, int h,
                              int w, Rows *rows, Norm *error, Norm *up, Norm *down) {
    float *square = rows->ring[0], *product = rows->ring[1];
    float *mu2 = rows->out[0], *s22 = rows->out[1], *s12 = rows->out[2];
    int ready = 0;
    for (int y = 0; y < h; y++) {
        for (; ready < h && ready <= y + RADIUS; ready++) {
            const float *a = img1 + (size_t)ready * w, *b = img2 + (size_t)ready * w;
            float *sq = square + (size_t)(ready % TAPS) * w, *pr = product + (size_t)(ready % TAPS) * w;
            for (int x = 0; x < w; x++) {
                sq[x] = b[x] * b[x];
                pr[x] = a[x] * b[x];
            }
        }
        const float *around[TAPS], *around_sq[TAPS], *around_pr[TAPS];
        for (int i = 0; i < TAPS; i++) {
            int src = mirror(y + i - RADIUS, h);
            around[i] = img2 + (size_t)src * w;
            around_sq[i] = square + (size_t)(src % TAPS) * w;
            around_pr[i] = product + (size_t)(src % TAPS) * w;
        }
        vertical(around, rows->padded[0] + RADIUS, w);
        vertical(around_sq, rows->padded[1] + RADIUS, w);
        vertical(around_pr, rows->padded[2] + RADIUS, w);
        horizontal(rows->padded[0], mu2, w);
        horizontal(rows->padded[1], s22, w);
        horizontal(rows->padded[2], s12, w);
        const float *restrict i1 = img1 + (size_t)y * w, *restrict m1 = mu1 + (size_t)y * w;
        const float *restrict v1 = sigma1 + (size_t)y * w, *restrict i2 = img2 + (size_t)y * w;
        float d1 = 0, d4 = 0, u1 = 0, u4 = 0, n1 = 0, n4 = 0;
#pragma omp simd reduction(+ : d1, d4, u1, u4, n1, n4)
        for (int x = 0; x < w; x++) {
            float diff = m1[x] - mu2[x];
            float num_m = 1.0f - diff * diff;
            float num_s = 2.0f * (s12[x] - m1[x] * mu2[x]) + c2;
            float denom_s = v1[x] + (s22[x] - mu2[x] * mu2[x]) + c2;
            float d = POSITIVE_PART(1.0f - num_m * num_s / denom_s);
            float ratio = (1.0f + fabsf(i2[x] - mu2[x])) / (1.0f + fabsf(i1[x] - m1[x])) - 1.0f;
            float u = POSITIVE_PART(ratio), v = POSITIVE_PART(-ratio);
            d1 += d;
            u1 += u;
            n1 += v;
            d *= d;
            u *= u;
            v *= v;
            d4 += d * d;
            u4 += u * u;
            n4 += v * v;
        }
        error->sum += d1;
        error->sum4 += d4;
        up->sum += u1;
        up->sum4 += u4;
        down->sum += n1;
        down->sum4 += n4;
    }
}

typedef struct {
    int h, w;
    float *xyb[3], *mu[3], *sigma[3];
} Scale;

typedef struct {
    PyObject_HEAD
    int h, w, scales;
    Scale scale[NUM_SCALES];
    float *memory;
    /* A candidate's working set, kept from one score to the next (a search scores several):
     * faulting in fresh pages for each cost as much as a blur. `busy` (read and written with
     * the GIL held) sends a second thread scoring at the same time to a working set of its own. */
    float *scratch;
    int busy;
} ReferenceObject;

static int count_scales(int h, int w) {
    int n = 0;
    while (n < NUM_SCALES && h >= MIN_SIDE && w >= MIN_SIDE) {
        n++;
        h = (h + 1) / 2;
        w = (w + 1) / 2;
    }
    return n;
}

/* Floats a working set needs: the candidate's XYB planes at full size, the linear planes from
 * the second scale on (downsampled in place from scale to scale), and the row scratch. */
static size_t work_floats(int h, int w) {
    size_t n = (size_t)h * w, half = (size_t)((h + 1) / 2) * ((w + 1) / 2);
    return 3 * n + 3 * half + row_floats(w);
}

typedef struct {
    float *xyb[3], *lin[3];
    Rows rows;
} Work;

static void work_layout(Work *work, float *base, int h, int w) {
    size_t n = (size_t)h * w, half = (size_t)((h + 1) / 2) * ((w + 1) / 2);
    for (int c = 0; c < 3; c++) work->xyb[c] = base + c * n;
    base += 3 * n;
    for (int c = 0; c < 3; c++) work->lin[c] = base + c * half;
    base += 3 * half;
    rows_layout(&work->rows, base, w);
}

/* The XYB planes of every scale in turn: scale 0 from the bytes, later ones from the linear
 * planes, which are downsampled for the next. `into(s)` says where scale s's planes go. */
static void next_xyb(Work *work, int s, int scales, const unsigned char *rgb, int h, int w, float *const xyb[3]) {
    if (s == 0) {
        first_scale(rgb, h, w, xyb, scales > 1 ? work->lin : NULL);
        return;
    }
    to_xyb(work->lin, xyb, (size_t)h * w);
    if (s + 1 < scales) downsample(work->lin, h, w);
}

static void prepare(ReferenceObject *self, const unsigned char *rgb, float *scratch) {
    Work work;
    if (!self->scales) return; /* nothing to prepare, and no working set (scratch is NULL) */
    work_layout(&work, scratch, self->h, self->w);
    for (int s = 0; s < self->scales; s++) {
        Scale *scale = &self->scale[s];
        next_xyb(&work, s, self->scales, rgb, scale->h, scale->w, scale->xyb);
        rows_layout(&work.rows, work.rows.padded[0], scale->w);
        for (int c = 0; c < 3; c++)
            prepare_plane(scale->xyb[c], scale->mu[c], scale->sigma[c], scale->h, scale->w, &work.rows);
    }
}

static double score_candidate(const ReferenceObject *self, const unsigned char *rgb, float *scratch) {
    Work work;
    double ssim[NUM_SCALES][6], edge[NUM_SCALES][12];
    work_layout(&work, scratch, self->h, self->w);
    for (int s = 0; s < self->scales; s++) {
        const Scale *scale = &self->scale[s];
        int h = scale->h, w = scale->w;
        size_t n = (size_t)h * w;
        next_xyb(&work, s, self->scales, rgb, h, w, work.xyb);
        rows_layout(&work.rows, work.rows.padded[0], w);
        for (int c = 0; c < 3; c++) {
            Norm error = {0, 0}, up = {0, 0}, down = {0, 0};
            compare_plane(scale->xyb[c], scale->mu[c], scale->sigma[c], work.xyb[c], h, w, &work.rows, &error, &up,
                          &down);
            ssim[s][2 * c] = error.sum / n;
            ssim[s][2 * c + 1] = pow(error.sum4 / n, 0.25);
            edge[s][4 * c] = up.sum / n;
            edge[s][4 * c + 1] = pow(up.sum4 / n, 0.25);
            edge[s][4 * c + 2] = down.sum / n;
            edge[s][4 * c + 3] = pow(down.sum4 / n, 0.25);
        }
    }
    double total = 0.0;
    int i = 0;
    for (int c = 0; c < 3; c++) {
        for (int s = 0; s < self->scales; s++) {
            for (int k = 0; k < 2; k++) {
                total += weights[i] * fabs(ssim[s][2 * c + k]);
                total += weights[i + 1] * fabs(edge[s][4 * c + k]);
                total += weights[i + 2] * fabs(edge[s][4 * c + k + 2]);
                i += 3;
            }
        }
    }
    total *= 0.9562382616834844;
    total = 2.326765642916932 * total - 0.020884521182843837 * total * total +
            6.248496625763138e-05 * total * total * total;
    return total > 0 ? 100.0 - 10.0 * pow(total, 0.6276336467831387) : 100.0;
}

/* -- the Python type ------------------------------------------------------------------------ */

static int read_rgb(PyObject *object, int h, int w, Py_buffer *view) {
    if (PyObject_GetBuffer(object, view, PyBUF_SIMPLE) < 0) return -1;
    if (view->len != (Py_ssize_t)h * w * 3) {
        PyErr_Format(PyExc_ValueError, "expected %zd bytes of RGB for %dx%d, got %zd",
                     (Py_ssize_t)h * w * 3, w, h, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static void Reference_dealloc(ReferenceObject *self) {
    PyMem_RawFree(self->memory);
    PyMem_RawFree(self->scratch);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Reference_init(ReferenceObject *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"rgb", "width", "height", NULL};
    PyObject *rgb;
    int w, h;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oii", names, &rgb, &w, &h)) return -1;
    /* 64 bytes a pixel bounds the reference (48) and a working set (15), so no size below
     * overflows size_t, on 32-bit machines too. */
    if (w < 1 || h < 1 || (double)w * h > 1e9 || (double)w * h * 64.0 > (double)SIZE_MAX) {
        PyErr_Format(PyExc_ValueError, "bad size %dx%d", w, h);
        return -1;
    }
    if (self->memory || self->busy) {
        PyErr_SetString(PyExc_TypeError, "a Reference is prepared once");
        return -1;
    }
    Py_buffer view;
    if (read_rgb(rgb, h, w, &view) < 0) return -1;
    self->h = h;
    self->w = w;
    self->scales = count_scales(h, w);
    size_t kept = 0;
    for (int s = 0, sh = h, sw = w; s < self->scales; s++, sh = (sh + 1) / 2, sw = (sw + 1) / 2)
        kept += 9 * (size_t)sh * sw;
    /* `memory` is published only once prepared: until then a score finds the Reference not
     * prepared, and `busy` refuses a second __init__ (the GIL is released while preparing). */
    float *memory = PyMem_RawMalloc((kept ? kept : 1) * sizeof(float));
    float *scratch = self->scales ? PyMem_RawMalloc(work_floats(h, w) * sizeof(float)) : NULL;
    if (!memory || (self->scales && !scratch)) {
        PyMem_RawFree(scratch);
        PyMem_RawFree(memory);
        PyBuffer_Release(&view);
        PyErr_NoMemory();
        return -1;
    }
    self->busy = 1;
    float *next = memory;
    for (int s = 0, sh = h, sw = w; s < self->scales; s++, sh = (sh + 1) / 2, sw = (sw + 1) / 2) {
        Scale *scale = &self->scale[s];
        size_t n = (size_t)sh * sw;
        scale->h = sh;
        scale->w = sw;
        for (int c = 0; c < 3; c++) {
            scale->xyb[c] = next;
            scale->mu[c] = next + n;
            scale->sigma[c] = next + 2 * n;
            next += 3 * n;
        }
    }
    const unsigned char *pixels = view.buf;
    Py_BEGIN_ALLOW_THREADS
    prepare(self, pixels, scratch);
    Py_END_ALLOW_THREADS
    self->memory = memory;
    self->scratch = scratch; /* the first candidate's working set */
    self->busy = 0;
    PyBuffer_Release(&view);
    return 0;
}

static PyObject *Reference_score(ReferenceObject *self, PyObject *rgb) {
    if (!self->memory) {
        PyErr_SetString(PyExc_ValueError, "the Reference is not prepared");
        return NULL;
    }
    Py_buffer view;
    if (read_rgb(rgb, self->h, self->w, &view) < 0) return NULL;
    if (!self->scales) {
        PyBuffer_Release(&view);
        return PyFloat_FromDouble(100.0);
    }
    int own = self->busy;
    float *scratch = own ? NULL : self->scratch;
    if (!scratch) {
        scratch = PyMem_RawMalloc(work_floats(self->h, self->w) * sizeof(float));
        if (!scratch) {
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
        if (!own) self->scratch = scratch;
    }
    self->busy = 1;
    double score;
    const unsigned char *pixels = view.buf;
    Py_BEGIN_ALLOW_THREADS
    score = score_candidate(self, pixels, scratch);
    Py_END_ALLOW_THREADS
    if (own)
        PyMem_RawFree(scratch);
    else
        self->busy = 0;
    PyBuffer_Release(&view);
    return PyFloat_FromDouble(score);
}

static PyObject *Reference_get_scales(ReferenceObject *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->scales);
}

static PyMethodDef Reference_methods[] = {
    {"score", (PyCFunction)Reference_score, METH_O,
     "score(rgb) -> float: SSIMULACRA2 of packed RGB bytes of the reference's size against it."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Reference_getset[] = {
    {"scales", (getter)Reference_get_scales, NULL, "scales of at least 8x8 pixels (0: too small to judge)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReferenceType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "app.render._ssimulacra2.Reference",
    .tp_doc = PyDoc_STR("Reference(rgb, width, height): a reference image prepared once, to score candidates against."),
    .tp_basicsize = sizeof(ReferenceObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Reference_init,
    .tp_dealloc = (destructor)Reference_dealloc,
    .tp_methods = Reference_methods,
    .tp_getset = Reference_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ssimulacra2", "SSIMULACRA2, compiled (see app/render/ssimulacra2.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__ssimulacra2(void) {
    init_tables();
    if (PyType_Ready(&ReferenceType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&ReferenceType);
    if (PyModule_AddObject(m, "Reference", (PyObject *)&ReferenceType) < 0) {
        Py_DECREF(&ReferenceType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
