//! Media token formulas (images, audio, video) as providers document them.
//!
//! Every formula is a pure function of the media's size (pixels or duration) and
//! returns, besides the token count, the versioned name of the formula that produced
//! it (for example `openai.tile@2025-08`), so a usage record can say which rule it was
//! measured by. A provider changing its rule means a new formula version here, never
//! a silent change of an old one.
//!
//! Arithmetic is integer wherever the documented procedure allows it; where a
//! provider defines a step with real numbers (square roots, scale factors), the step
//! is evaluated exactly in integers (`isqrt` of the exact rational) instead of with
//! floats, so results cannot drift on boundary cases. Each function states its
//! rounding.
//!
//! Sources (stored copies of the providers' pages, read 2026):
//! - OpenAI, "Images and vision" guide, section "Calculating costs"
//!   (`platform.openai.com/docs/guides/images-vision#calculating-costs`).
//! - Anthropic, "Vision" guide, sections "Evaluate image size" and
//!   "Calculate image costs" (`docs.claude.com/en/docs/build-with-claude/vision`).
//! - Google, Gemini API "Understand and count tokens", section "Count multimodal
//!   tokens" (`ai.google.dev/gemini-api/docs/tokens`), and the Gemini "Image
//!   understanding" page, section "Technical details" (token rules per model).
//! - Qwen, Qwen2-VL / Qwen2.5-VL model cards and `preprocessor_config.json`
//!   (`min_pixels` 3136, `max_pixels` 12845056, 14-px patches merged 2×2, i.e. one
//!   token per 28×28 pixels), and the `smart_resize` procedure of `qwen-vl-utils`.

use ciyuan_core::{Direction, Modality, TokenMap};

/// The `detail` setting of an OpenAI image input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageDetail {
    /// `"detail": "low"`: a fixed budget (the model's base tokens).
    Low,
    /// `"detail": "high"`: tiles or patches counted from the image's size.
    High,
    /// `"detail": "auto"`: the model decides. OpenAI documents no rule for the
    /// choice, so it is measured as [`ImageDetail::High`] (the larger, never
    /// under-counting, of the two).
    Auto,
}

/// Tokens of one image, with the formula that produced them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTokens {
    /// The image's tokens.
    pub tokens: u64,
    /// The formula and its version, `provider.formula@version`.
    pub formula: &'static str,
    /// The size (width, height) the formula counted, after its documented
    /// resizing; the input size when the formula does not resize.
    pub resized: (u32, u32),
}

impl ImageTokens {
    /// Adds these tokens to `map` as image tokens in `direction`.
    /// `None` on overflow (the map is then unchanged for this entry).
    pub fn add_to(&self, map: &mut TokenMap, direction: Direction) -> Option<()> {
        let count = i64::try_from(self.tokens).ok()?;
        map.add(Modality::Image, direction, count)
    }
}

/// Why a media formula could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    /// A width or height of zero.
    #[error("image has a zero dimension: {width}x{height}")]
    ZeroDimension {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// The provider rejects images this large.
    #[error("image {width}x{height} exceeds the documented maximum of {max}x{max} px")]
    TooLarge {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// Documented maximum side in pixels.
        max: u32,
    },
    /// The provider rejects images this elongated.
    #[error("image {width}x{height} has an aspect ratio above {max_ratio}:1")]
    AspectRatio {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// Documented maximum ratio of the long side to the short side.
        max_ratio: u32,
    },
    /// A formula parameter is out of its meaningful range.
    #[error("invalid formula parameter: {0}")]
    InvalidParameter(&'static str),
    /// The token count does not fit in 64 bits.
    #[error("token count overflows")]
    Overflow,
    /// No image formula is known for the model.
    #[error("no image token formula is known for model {0:?}")]
    UnknownModel(String),
}

fn check_nonzero(width: u32, height: u32) -> Result<(), MediaError> {
    if width == 0 || height == 0 {
        return Err(MediaError::ZeroDimension { width, height });
    }
    Ok(())
}

/// `ceil(a / b)` for `b > 0`.
fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

/// `round(a * num / den)`, half away from zero, at least 1; `den > 0`.
fn scale_round(a: u32, num: u32, den: u32) -> u32 {
    let n = u64::from(a) * u64::from(num);
    let d = u64::from(den);
    let r = (2 * n + d) / (2 * d);
    u32::try_from(r.max(1)).unwrap_or(u32::MAX)
}

fn to_u32(v: u128) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------
// OpenAI: tiles
// ---------------------------------------------------------------------------

/// Formula name of [`openai_tile`].
pub const OPENAI_TILE: &str = "openai.tile@2025-08";

/// OpenAI's tile formula (GPT-4o, GPT-4.1, GPT-4.5, GPT-4o-mini, GPT-5, o1, o3,
/// computer-use-preview).
///
/// Source: OpenAI "Images and vision" guide, "Calculating costs", section
/// "GPT 4o, GPT-4.1, GPT-4o-mini, CUA, and o-series (except o4-mini)"
/// (`platform.openai.com/docs/guides/images-vision#calculating-costs`):
/// `"detail": "low"` costs the model's base tokens; for `"high"` the image is
/// scaled to fit in 2048×2048 (aspect kept), then scaled so its shortest side is
/// 768 px, then every 512-px square costs `per_tile`, plus `base`.
/// The documented base/tile pairs: gpt-5 70/140; 4o, 4.1, 4.5 85/170;
/// 4o-mini 2833/5667; o1, o1-pro, o3 75/150; computer-use-preview 65/129.
///
/// Rounding (not stated in the guide): both scalings only shrink, and the scaled
/// side is rounded to the nearest pixel (half up). This matches what OpenAI's
/// community forum reports as billed on edge cases (2049×513 → 2 tile rows,
/// 2050×513 → 1 row, thread "Vision Pricing calculator: inaccurate
/// resizing/rounding vs API costs").
/// [`ImageDetail::Auto`] is measured as high.
pub fn openai_tile(
    width: u32,
    height: u32,
    detail: ImageDetail,
    base: u64,
    per_tile: u64,
) -> Result<ImageTokens, MediaError> {
    openai_tile_sized(width, height, detail, base, per_tile, 768)
}

/// [`openai_tile`] with another target for the shortest side.
///
/// The guide's "GPT Image 1" section uses the same procedure with the shortest side
/// scaled to 512 px (base 65, tile 129 at low input fidelity); its high-fidelity
/// surcharge (4160 or 6240 tokens by aspect ratio) is not part of this function.
pub fn openai_tile_sized(
    width: u32,
    height: u32,
    detail: ImageDetail,
    base: u64,
    per_tile: u64,
    short_side: u32,
) -> Result<ImageTokens, MediaError> {
    check_nonzero(width, height)?;
    if short_side == 0 {
        return Err(MediaError::InvalidParameter("short_side must be positive"));
    }
    if detail == ImageDetail::Low {
        return Ok(ImageTokens {
            tokens: base,
            formula: OPENAI_TILE,
            resized: (width, height),
        });
    }
    let (mut w, mut h) = (width, height);
    // Fit within 2048 x 2048.
    if w.max(h) > 2048 {
        if w >= h {
            h = scale_round(h, 2048, w);
            w = 2048;
        } else {
            w = scale_round(w, 2048, h);
            h = 2048;
        }
    }
    // Shortest side to `short_side`, only ever shrinking.
    if w.min(h) > short_side {
        if w <= h {
            h = scale_round(h, short_side, w);
            w = short_side;
        } else {
            w = scale_round(w, short_side, h);
            h = short_side;
        }
    }
    let tiles = ceil_div(u64::from(w), 512) * ceil_div(u64::from(h), 512);
    let tokens = per_tile
        .checked_mul(tiles)
        .and_then(|t| t.checked_add(base))
        .ok_or(MediaError::Overflow)?;
    Ok(ImageTokens {
        tokens,
        formula: OPENAI_TILE,
        resized: (w, h),
    })
}

// ---------------------------------------------------------------------------
// OpenAI: patches
// ---------------------------------------------------------------------------

/// Formula name of [`openai_patch`].
pub const OPENAI_PATCH: &str = "openai.patch@2025-08";

/// Most 32-px patches an image may cover in [`openai_patch`].
pub const OPENAI_PATCH_CAP: u64 = 1536;

/// OpenAI's patch formula (gpt-4.1-mini, gpt-4.1-nano, o4-mini, gpt-5-mini,
/// gpt-5-nano).
///
/// Source: OpenAI "Images and vision" guide, "Calculating costs", section
/// "GPT-4.1-mini, GPT-4.1-nano, o4-mini"
/// (`platform.openai.com/docs/guides/images-vision#calculating-costs`):
///
/// - A. `raw_patches = ceil(width/32) × ceil(height/32)`;
/// - B. above 1536 patches the image is scaled by
///   `r = √(32²×1536/(width×height))`, then
///   `r = r × min(floor(width×r/32)/(width×r/32), floor(height×r/32)/(height×r/32))`;
/// - C. `image_tokens = ceil(resized_width/32) × ceil(resized_height/32)`, capped at 1536;
/// - D. times the model's multiplier (gpt-5-mini 1.62, gpt-5-nano 2.46,
///   gpt-4.1-mini 1.62, gpt-4.1-nano 2.46, o4-mini 1.72).
///
/// `multiplier_milli` is the multiplier in thousandths (1620 for 1.62; 1000 for
/// none). Step B is evaluated exactly: `width×r/32 = √(1536×width/height)`, so the
/// whole-patch counts are `isqrt(⌊1536×width/height⌋)` and its mirror, and the
/// resized side that is not a whole number of patches is `side × k×32/other`
/// without floats (the guide's float version misrounds its own 1800×2400 example
/// to 1408.0000001 px). Deviation for degenerate shapes: where step B would leave
/// a side with zero patches (aspect ratio above 1536:1) that side is kept at one
/// patch, and the cap applies. Rounding of step D is not documented; the result is
/// rounded up, `ceil(patches × multiplier_milli / 1000)`.
/// The `detail` setting is not part of this formula.
pub fn openai_patch(
    width: u32,
    height: u32,
    multiplier_milli: u64,
) -> Result<ImageTokens, MediaError> {
    check_nonzero(width, height)?;
    if multiplier_milli == 0 {
        return Err(MediaError::InvalidParameter(
            "multiplier_milli must be positive",
        ));
    }
    let (w, h) = (u128::from(width), u128::from(height));
    let raw = w.div_ceil(32) * h.div_ceil(32);
    let cap = u128::from(OPENAI_PATCH_CAP);
    let (patches, resized) = if raw <= cap {
        (raw, (width, height))
    } else {
        let kw = (cap * w / h).isqrt().max(1);
        let kh = (cap * h / w).isqrt().max(1);
        // r = min(kw*32/w, kh*32/h); compare kw/w with kh/h by cross-multiplying.
        if kw * h <= kh * w {
            // Width is a whole number of patches: kw; height = h * kw / w.
            let rh_patches = (h * kw).div_ceil(w);
            let rh_px = (h * kw * 32 + w / 2) / w;
            (kw * rh_patches, (to_u32(kw * 32), to_u32(rh_px)))
        } else {
            let rw_patches = (w * kh).div_ceil(h);
            let rw_px = (w * kh * 32 + h / 2) / h;
            (kh * rw_patches, (to_u32(rw_px), to_u32(kh * 32)))
        }
    };
    let patches = patches.min(cap);
    let tokens = (patches * u128::from(multiplier_milli)).div_ceil(1000);
    let tokens = u64::try_from(tokens).map_err(|_| MediaError::Overflow)?;
    Ok(ImageTokens {
        tokens,
        formula: OPENAI_PATCH,
        resized,
    })
}

// ---------------------------------------------------------------------------
// Anthropic
// ---------------------------------------------------------------------------

/// Formula name of [`anthropic_image`].
pub const ANTHROPIC_AREA: &str = "anthropic.area750@2024-03";
/// Formula name of [`anthropic_patch`].
pub const ANTHROPIC_PATCH: &str = "anthropic.patch28@2026-04";

/// Largest image side Anthropic accepts (larger images are rejected).
pub const ANTHROPIC_MAX_SIDE: u32 = 8000;
/// Long edge above which Anthropic scales an image down.
pub const ANTHROPIC_MAX_EDGE: u32 = 1568;
/// Pixel count above which [`anthropic_image`] scales an image down: 784×1568,
/// the largest size the guide's table lists as "will not be resized" (the prose
/// says "more than ~1,600 tokens", i.e. about 1.2 megapixels).
pub const ANTHROPIC_MAX_PIXELS: u64 = 784 * 1568;

/// Anthropic's image formula: `tokens = (width px × height px) / 750`.
///
/// Source: Anthropic "Vision" guide, "Evaluate image size" and "Calculate image
/// costs" (`docs.claude.com/en/docs/build-with-claude/vision#calculate-image-costs`):
/// images over 8000×8000 px are rejected; an image whose long edge is more than
/// 1568 px, or that is more than ~1,600 tokens, is first scaled down, keeping its
/// aspect ratio, until it is within the limits; then `tokens = (w × h) / 750`.
///
/// Resizing: the long edge is scaled to 1568 (other side rounded to the nearest
/// pixel), then, if the area is still above [`ANTHROPIC_MAX_PIXELS`], both sides
/// are scaled by `√(max/area)` and rounded down (exactly, by integer square root).
/// Rounding: tokens are rounded up, which reproduces the guide's table
/// (200×200 → ~54, 1000×1000 → ~1334, 1092×1092 → ~1590).
pub fn anthropic_image(width: u32, height: u32) -> Result<ImageTokens, MediaError> {
    check_anthropic(width, height)?;
    let (mut w, mut h) = (width, height);
    if w.max(h) > ANTHROPIC_MAX_EDGE {
        if w >= h {
            h = scale_round(h, ANTHROPIC_MAX_EDGE, w);
            w = ANTHROPIC_MAX_EDGE;
        } else {
            w = scale_round(w, ANTHROPIC_MAX_EDGE, h);
            h = ANTHROPIC_MAX_EDGE;
        }
    }
    let area = u64::from(w) * u64::from(h);
    if area > ANTHROPIC_MAX_PIXELS {
        let (wu, hu, m) = (
            u128::from(w),
            u128::from(h),
            u128::from(ANTHROPIC_MAX_PIXELS),
        );
        // w * sqrt(m / (w h)) = sqrt(m w / h)
        let nw = (m * wu / hu).isqrt().max(1);
        let nh = (m * hu / wu).isqrt().max(1);
        w = to_u32(nw);
        h = to_u32(nh);
    }
    let tokens = ceil_div(u64::from(w) * u64::from(h), 750);
    Ok(ImageTokens {
        tokens,
        formula: ANTHROPIC_AREA,
        resized: (w, h),
    })
}

fn check_anthropic(width: u32, height: u32) -> Result<(), MediaError> {
    check_nonzero(width, height)?;
    if width > ANTHROPIC_MAX_SIDE || height > ANTHROPIC_MAX_SIDE {
        return Err(MediaError::TooLarge {
            width,
            height,
            max: ANTHROPIC_MAX_SIDE,
        });
    }
    Ok(())
}

/// Limits of an Anthropic resolution tier for [`anthropic_patch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AnthropicTier {
    /// Largest long edge, in pixels, after rounding up to whole 28-px patches.
    pub max_edge: u32,
    /// Largest number of 28×28 patches (visual tokens).
    pub max_tokens: u64,
}

impl AnthropicTier {
    /// The standard tier: 1568 px, 1568 tokens.
    pub const STANDARD: Self = Self {
        max_edge: 1568,
        max_tokens: 1568,
    };
    /// The high-resolution tier (Claude Opus 4.7 and later, as reported): 2576 px,
    /// 4784 tokens.
    pub const HIGH_RES: Self = Self {
        max_edge: 2576,
        max_tokens: 4784,
    };
}

/// Anthropic's 28-px patch formula: `ceil(width/28) × ceil(height/28)` after
/// scaling down to the tier's limits.
///
/// Source: Anthropic "Vision" guide, section "Resolution and token cost"
/// (`platform.claude.com/docs/en/build-with-claude/vision#resolution-and-token-cost`),
/// which — as quoted in public issues (teamchong/pxpipe#26, bradautomates/claude-video#176);
/// the page itself was not readable from here — replaces the `/750` estimate with
/// 28×28-px patches and two tiers ([`AnthropicTier`]). An image fits when
/// `ceil(w/28)×28` and `ceil(h/28)×28` are at most `max_edge` and the patch count is
/// at most `max_tokens`; otherwise its long side is reduced to the largest length
/// for which the image, short side rounded to the nearest pixel from the aspect
/// ratio, fits.
/// Examples from those reports: 200×200 → 64, 1000×1000 → 1296, 1092×1092 → 1521,
/// 1568×728 → 1456, 1928×1928 → 4761 (high-res) or 1521 (standard).
pub fn anthropic_patch(
    width: u32,
    height: u32,
    tier: AnthropicTier,
) -> Result<ImageTokens, MediaError> {
    check_anthropic(width, height)?;
    if tier.max_edge < 28 || tier.max_tokens == 0 {
        return Err(MediaError::InvalidParameter("tier limits below one patch"));
    }
    let fits = |w: u32, h: u32| {
        let pw = u64::from(w).div_ceil(28);
        let ph = u64::from(h).div_ceil(28);
        pw * 28 <= u64::from(tier.max_edge)
            && ph * 28 <= u64::from(tier.max_edge)
            && pw * ph <= tier.max_tokens
    };
    let (w, h) = if fits(width, height) {
        (width, height)
    } else {
        let (long, short) = (width.max(height), width.min(height));
        let short_for = |l: u32| scale_round(short, l, long);
        // Largest l in [1, long) with fits(l, short_for(l)); 1 always fits.
        let (mut lo, mut hi) = (1u32, long);
        while lo + 1 < hi {
            let mid = lo + (hi - lo) / 2;
            if fits(mid, short_for(mid)) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        if width >= height {
            (lo, short_for(lo))
        } else {
            (short_for(lo), lo)
        }
    };
    let tokens = u64::from(w).div_ceil(28) * u64::from(h).div_ceil(28);
    Ok(ImageTokens {
        tokens,
        formula: ANTHROPIC_PATCH,
        resized: (w, h),
    })
}

// ---------------------------------------------------------------------------
// Gemini
// ---------------------------------------------------------------------------

/// Formula name of [`gemini_image`].
pub const GEMINI_IMAGE: &str = "gemini.image@2025-02";
/// Formula name of [`gemini_15_image`].
pub const GEMINI_15_IMAGE: &str = "gemini.image-1.5@2024-05";
/// Formula name of [`gemini_audio`].
pub const GEMINI_AUDIO: &str = "gemini.audio@2025-02";
/// Formula name of [`gemini_video`].
pub const GEMINI_VIDEO: &str = "gemini.video@2025-02";

/// Tokens of one Gemini image tile.
pub const GEMINI_TILE_TOKENS: u64 = 258;
/// Gemini audio tokens per second.
pub const GEMINI_AUDIO_PER_SECOND: u64 = 32;
/// Gemini video tokens per second.
pub const GEMINI_VIDEO_PER_SECOND: u64 = 263;

/// Gemini (2.0 and later) image tokens.
///
/// Source: Gemini API "Understand and count tokens", "Count multimodal tokens"
/// (`ai.google.dev/gemini-api/docs/tokens`): "With Gemini 2.0, image inputs with
/// both dimensions <=384 pixels are counted as 258 tokens. Images larger in one or
/// both dimensions are cropped and scaled as needed into tiles of 768x768 pixels,
/// each counted as 258 tokens."
///
/// The page does not say how many tiles; this counts the 768×768 tiles that cover
/// the image, `ceil(w/768) × ceil(h/768)` (the reading of "Gemini by Example",
/// `geminibyexample.com/027-calculate-input-tokens`). `resized` is the tiled
/// canvas. Gemini 3's `media_resolution` budgets are not modelled here.
pub fn gemini_image(width: u32, height: u32) -> Result<ImageTokens, MediaError> {
    check_nonzero(width, height)?;
    if width <= 384 && height <= 384 {
        return Ok(ImageTokens {
            tokens: GEMINI_TILE_TOKENS,
            formula: GEMINI_IMAGE,
            resized: (width, height),
        });
    }
    let tx = u64::from(width).div_ceil(768);
    let ty = u64::from(height).div_ceil(768);
    Ok(ImageTokens {
        tokens: GEMINI_TILE_TOKENS * tx * ty,
        formula: GEMINI_IMAGE,
        resized: (to_u32(u128::from(tx * 768)), to_u32(u128::from(ty * 768))),
    })
}

/// Gemini 1.5 Flash / 1.5 Pro image tokens.
///
/// Source: Gemini API "Image understanding", "Technical details" (token rule for
/// Gemini 1.5): both sides ≤ 384 px → 258 tokens; otherwise the image is cropped
/// into tiles whose size is the smallest side divided by 1.5, adjusted to be at
/// least 256 and at most 768 px, and each tile costs 258 tokens.
/// Rounding: the tile side is `floor(min_side / 1.5)`; tiles are
/// `ceil(w/tile) × ceil(h/tile)`.
pub fn gemini_15_image(width: u32, height: u32) -> Result<ImageTokens, MediaError> {
    check_nonzero(width, height)?;
    if width <= 384 && height <= 384 {
        return Ok(ImageTokens {
            tokens: GEMINI_TILE_TOKENS,
            formula: GEMINI_15_IMAGE,
            resized: (width, height),
        });
    }
    let unit = (u64::from(width.min(height)) * 2 / 3).clamp(256, 768);
    let tx = u64::from(width).div_ceil(unit);
    let ty = u64::from(height).div_ceil(unit);
    Ok(ImageTokens {
        tokens: GEMINI_TILE_TOKENS * tx * ty,
        formula: GEMINI_15_IMAGE,
        resized: (to_u32(u128::from(tx * 768)), to_u32(u128::from(ty * 768))),
    })
}

fn per_second(milliseconds: u64, rate: u64) -> u64 {
    let t = (u128::from(milliseconds) * u128::from(rate)).div_ceil(1000);
    u64::try_from(t).unwrap_or(u64::MAX)
}

/// Gemini audio tokens: 32 tokens per second.
///
/// Source: Gemini API "Understand and count tokens", "Count multimodal tokens"
/// (`ai.google.dev/gemini-api/docs/tokens`): "audio at 32 tokens per second".
/// Rounding: a fraction of a token is rounded up, `ceil(ms × 32 / 1000)`
/// (the page gives only the per-second rate). Saturates at `u64::MAX`.
pub fn gemini_audio(milliseconds: u64) -> u64 {
    per_second(milliseconds, GEMINI_AUDIO_PER_SECOND)
}

/// Gemini video tokens: 263 tokens per second.
///
/// Source: Gemini API "Understand and count tokens", "Count multimodal tokens"
/// (`ai.google.dev/gemini-api/docs/tokens`): "video at 263 tokens per second".
/// Rounding: `ceil(ms × 263 / 1000)`. Saturates at `u64::MAX`.
pub fn gemini_video(milliseconds: u64) -> u64 {
    per_second(milliseconds, GEMINI_VIDEO_PER_SECOND)
}

// ---------------------------------------------------------------------------
// Qwen-VL
// ---------------------------------------------------------------------------

/// Formula name of [`qwen_vl_image`].
pub const QWEN_VL: &str = "qwen.vl-smart-resize@2024-09";
/// Pixels of one Qwen-VL image token's side (14-px patches merged 2×2).
pub const QWEN_FACTOR: u32 = 28;
/// Default `min_pixels` (4 tokens) of Qwen2-VL / Qwen2.5-VL.
pub const QWEN_MIN_PIXELS: u64 = 4 * 28 * 28;
/// Default `max_pixels` (16384 tokens) of Qwen2-VL / Qwen2.5-VL.
pub const QWEN_MAX_PIXELS: u64 = 16384 * 28 * 28;
/// Largest aspect ratio `smart_resize` accepts.
pub const QWEN_MAX_RATIO: u32 = 200;

/// Qwen2-VL / Qwen2.5-VL image tokens with the default pixel bounds
/// (`min_pixels` 3136, `max_pixels` 12845056, i.e. 4 to 16384 tokens).
///
/// See [`qwen_vl_image_with`].
pub fn qwen_vl_image(width: u32, height: u32) -> Result<ImageTokens, MediaError> {
    qwen_vl_image_with(width, height, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)
}

/// Qwen2-VL / Qwen2.5-VL image tokens: `(h/28) × (w/28)` after `smart_resize`.
///
/// Sources: the Qwen2-VL and Qwen2.5-VL model cards ("The default range for the
/// number of visual tokens per image in the model is 4-16384"; `min_pixels` and
/// `max_pixels` bound it) and `preprocessor_config.json` (patch 14, merge 2,
/// `min_pixels` 3136, `max_pixels` 12845056); the resize procedure is
/// `smart_resize` in `qwen-vl-utils` (`vision_process.py`):
///
/// 1. aspect ratio above 200 is an error;
/// 2. each side is rounded to the nearest multiple of 28 (at least 28);
/// 3. if the area exceeds `max_pixels`, each side becomes
///    `floor(side / β / 28) × 28` with `β = √(h×w / max_pixels)`;
///    if it is below `min_pixels`, `ceil(side × β / 28) × 28` with
///    `β = √(min_pixels / (h×w))`.
///
/// Step 2 rounds halves to even, like Python's `round`. Step 3 is computed exactly
/// (`side/β/28 = √(side × max_pixels / (other × 784))`) instead of with floats.
/// Choice: only the image-pad tokens are counted; the two markers
/// `<|vision_start|>` and `<|vision_end|>` that wrap an image in the prompt are
/// text-template tokens and are not included.
pub fn qwen_vl_image_with(
    width: u32,
    height: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<ImageTokens, MediaError> {
    check_nonzero(width, height)?;
    if max_pixels < u64::from(QWEN_FACTOR * QWEN_FACTOR) || min_pixels > max_pixels {
        return Err(MediaError::InvalidParameter(
            "need 784 <= max_pixels and min_pixels <= max_pixels",
        ));
    }
    let (long, short) = (width.max(height), width.min(height));
    if u64::from(long) > u64::from(short) * u64::from(QWEN_MAX_RATIO) {
        return Err(MediaError::AspectRatio {
            width,
            height,
            max_ratio: QWEN_MAX_RATIO,
        });
    }
    let f = u128::from(QWEN_FACTOR);
    let round_half_even = |n: u32| -> u128 {
        let n = u128::from(n);
        let (q, r) = (n / f, n % f);
        let q = match (2 * r).cmp(&f) {
            std::cmp::Ordering::Greater => q + 1,
            std::cmp::Ordering::Less => q,
            std::cmp::Ordering::Equal => q + (q % 2),
        };
        q.max(1)
    };
    let (w, h) = (u128::from(width), u128::from(height));
    let (mut pw, mut ph) = (round_half_even(width), round_half_even(height));
    let (min_p, max_p) = (u128::from(min_pixels), u128::from(max_pixels));
    let ff = f * f;
    if pw * ph * ff > max_p {
        // floor(side / beta / 28) = isqrt(floor(side * max / (other * 784)))
        // (at least one unit per side, as current `qwen-vl-utils` clamps to 28 px)
        ph = (h * max_p / (w * ff)).isqrt().max(1);
        pw = (w * max_p / (h * ff)).isqrt().max(1);
    } else if pw * ph * ff < min_p {
        // ceil(side * beta / 28) = smallest k with k^2 * other * 784 >= side * min
        let ceil_sqrt = |num: u128, den: u128| {
            let mut k = (num / den).isqrt();
            while k * k * den < num {
                k += 1;
            }
            k
        };
        ph = ceil_sqrt(h * min_p, w * ff);
        pw = ceil_sqrt(w * min_p, h * ff);
    }
    let tokens = u64::try_from(pw * ph).map_err(|_| MediaError::Overflow)?;
    Ok(ImageTokens {
        tokens,
        formula: QWEN_VL,
        resized: (to_u32(pw * f), to_u32(ph * f)),
    })
}

// ---------------------------------------------------------------------------
// Model table
// ---------------------------------------------------------------------------

/// Which image formula a model uses, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormula {
    /// [`openai_tile`] with these base and per-tile tokens.
    OpenAiTile {
        /// Tokens of a low-detail image, and added to every high-detail one.
        base: u64,
        /// Tokens of each 512-px tile.
        per_tile: u64,
    },
    /// [`openai_patch`] with this multiplier in thousandths.
    OpenAiPatch {
        /// The model's multiplier × 1000.
        multiplier_milli: u64,
    },
    /// [`anthropic_image`] (`w×h/750`).
    Anthropic,
    /// [`anthropic_patch`] in this tier.
    AnthropicPatch(AnthropicTier),
    /// [`gemini_image`].
    Gemini,
    /// [`gemini_15_image`].
    Gemini15,
    /// [`qwen_vl_image`].
    QwenVl,
}

impl ImageFormula {
    /// Tokens of a `width`×`height` image; `detail` matters only to
    /// [`ImageFormula::OpenAiTile`].
    pub fn tokens(
        &self,
        width: u32,
        height: u32,
        detail: ImageDetail,
    ) -> Result<ImageTokens, MediaError> {
        match *self {
            Self::OpenAiTile { base, per_tile } => {
                openai_tile(width, height, detail, base, per_tile)
            }
            Self::OpenAiPatch { multiplier_milli } => openai_patch(width, height, multiplier_milli),
            Self::Anthropic => anthropic_image(width, height),
            Self::AnthropicPatch(tier) => anthropic_patch(width, height, tier),
            Self::Gemini => gemini_image(width, height),
            Self::Gemini15 => gemini_15_image(width, height),
            Self::QwenVl => qwen_vl_image(width, height),
        }
    }
}

const fn tile(base: u64, per_tile: u64) -> Option<ImageFormula> {
    Some(ImageFormula::OpenAiTile { base, per_tile })
}

const fn patch(multiplier_milli: u64) -> Option<ImageFormula> {
    Some(ImageFormula::OpenAiPatch { multiplier_milli })
}

/// Model patterns, first match wins; a trailing `*` matches any suffix, otherwise
/// the name must match exactly. `None` marks models known to take no images.
const MODEL_TABLE: &[(&str, Option<ImageFormula>)] = &[
    // OpenAI patch models ("GPT-4.1-mini, GPT-4.1-nano, o4-mini" section).
    ("gpt-4.1-mini*", patch(1620)),
    ("gpt-4.1-nano*", patch(2460)),
    ("gpt-5-mini*", patch(1620)),
    ("gpt-5-nano*", patch(2460)),
    ("o4-mini*", patch(1720)),
    // OpenAI tile models (base / tile table).
    ("gpt-4o-mini*", tile(2833, 5667)),
    ("gpt-4o*", tile(85, 170)),
    ("chatgpt-4o*", tile(85, 170)),
    ("gpt-4.1*", tile(85, 170)),
    ("gpt-4.5*", tile(85, 170)),
    ("gpt-5", tile(70, 140)),
    ("gpt-5-20*", tile(70, 140)),
    ("gpt-5-chat-latest", tile(70, 140)),
    ("o1-mini*", None),
    ("o3-mini*", None),
    ("o1*", tile(75, 150)),
    ("o3*", tile(75, 150)),
    ("computer-use-preview*", tile(65, 129)),
    // Anthropic.
    ("claude-*", Some(ImageFormula::Anthropic)),
    // Google.
    ("gemini-1.5*", Some(ImageFormula::Gemini15)),
    ("gemini-*", Some(ImageFormula::Gemini)),
    // Qwen.
    ("qwen-vl*", Some(ImageFormula::QwenVl)),
    ("qwen2-vl*", Some(ImageFormula::QwenVl)),
    ("qwen2.5-vl*", Some(ImageFormula::QwenVl)),
];

fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// Which image formula `model` uses, from a small built-in table.
///
/// The name is compared case-insensitively after dropping any routing prefix up to
/// the last `/` (so `openai/gpt-4o` and `Qwen/Qwen2.5-VL-7B-Instruct` work).
/// Patterns, first match wins: `gpt-4.1-mini*`, `gpt-4.1-nano*`, `gpt-5-mini*`,
/// `gpt-5-nano*`, `o4-mini*` (patches); `gpt-4o-mini*`, `gpt-4o*`, `chatgpt-4o*`,
/// `gpt-4.1*`, `gpt-4.5*`, `gpt-5`, `gpt-5-20*`, `gpt-5-chat-latest`, `o1*`,
/// `o3*`, `computer-use-preview*` (tiles; `o1-mini*` and `o3-mini*` take no
/// images); `claude-*`; `gemini-1.5*`, `gemini-*`; `qwen-vl*`, `qwen2-vl*`,
/// `qwen2.5-vl*`. `None` for anything else.
pub fn image_formula_for(model: &str) -> Option<ImageFormula> {
    let name = model
        .rsplit('/')
        .next()
        .unwrap_or(model)
        .to_ascii_lowercase();
    MODEL_TABLE
        .iter()
        .find(|(pattern, _)| pattern_matches(pattern, &name))
        .and_then(|(_, formula)| *formula)
}

/// Tokens of a `width`×`height` image sent to `model`, by [`image_formula_for`].
pub fn image_tokens_for(
    model: &str,
    width: u32,
    height: u32,
    detail: ImageDetail,
) -> Result<ImageTokens, MediaError> {
    image_formula_for(model)
        .ok_or_else(|| MediaError::UnknownModel(model.to_owned()))?
        .tokens(width, height, detail)
}
