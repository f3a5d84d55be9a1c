//! Media token formulas against the providers' published worked examples, plus edge
//! cases. Each documented example names its source.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_core::{Direction, TokenMap};
use ciyuan_measure::media::*;

fn tile(w: u32, h: u32, d: ImageDetail, base: u64, per: u64) -> ImageTokens {
    openai_tile(w, h, d, base, per).unwrap()
}

// --- OpenAI tile formula -----------------------------------------------------
// Source: OpenAI "Images and vision" guide, "Calculating costs",
// "Cost calculation examples (for gpt-4o)".

#[test]
fn openai_tile_documented_1024_square_high_is_765() {
    let t = tile(1024, 1024, ImageDetail::High, 85, 170);
    assert_eq!(t.tokens, 765);
    assert_eq!(t.resized, (768, 768));
    assert_eq!(t.formula, "openai.tile@2025-08");
}

#[test]
fn openai_tile_documented_2048x4096_high_is_1105() {
    let t = tile(2048, 4096, ImageDetail::High, 85, 170);
    assert_eq!(t.tokens, 1105);
    assert_eq!(t.resized, (768, 1536));
}

#[test]
fn openai_tile_documented_4096x8192_low_is_85() {
    assert_eq!(tile(4096, 8192, ImageDetail::Low, 85, 170).tokens, 85);
}

#[test]
fn openai_tile_auto_is_high() {
    assert_eq!(
        tile(2048, 4096, ImageDetail::Auto, 85, 170),
        tile(2048, 4096, ImageDetail::High, 85, 170)
    );
}

#[test]
fn openai_tile_model_families() {
    // Base/tile table of the same section: 4o-mini 2833/5667, gpt-5 70/140,
    // o1/o3 75/150, computer-use-preview 65/129.
    assert_eq!(
        tile(1024, 1024, ImageDetail::High, 2833, 5667).tokens,
        2833 + 4 * 5667
    );
    assert_eq!(tile(1024, 1024, ImageDetail::High, 70, 140).tokens, 630);
    assert_eq!(tile(1024, 1024, ImageDetail::High, 75, 150).tokens, 675);
    assert_eq!(tile(1024, 1024, ImageDetail::Low, 65, 129).tokens, 65);
}

#[test]
fn openai_tile_rounding_matches_reported_billing() {
    // OpenAI community forum, "Vision Pricing calculator: inaccurate
    // resizing/rounding vs API costs": GPT-4.1 billed 2049x513 = 1453 and
    // 2050x513 = 773 (each with 8 tokens of message overhead).
    assert_eq!(tile(2049, 513, ImageDetail::High, 85, 170).tokens + 8, 1453);
    assert_eq!(tile(2050, 513, ImageDetail::High, 85, 170).tokens + 8, 773);
}

#[test]
fn openai_tile_edges() {
    assert_eq!(tile(1, 1, ImageDetail::High, 85, 170).tokens, 255);
    assert_eq!(tile(512, 512, ImageDetail::High, 85, 170).tokens, 255);
    assert_eq!(tile(513, 512, ImageDetail::High, 85, 170).tokens, 425);
    assert_eq!(
        tile(768, 768, ImageDetail::High, 85, 170).resized,
        (768, 768)
    );
    // Very wide: fit in 2048 gives 2048x2, no short-side scaling; 4 tiles.
    let wide = tile(10_000, 10, ImageDetail::High, 85, 170);
    assert_eq!(wide.resized, (2048, 2));
    assert_eq!(wide.tokens, 85 + 4 * 170);
    let tall = tile(10, 10_000, ImageDetail::High, 85, 170);
    assert_eq!(tall.resized, (2, 2048));
    assert_eq!(tall.tokens, 765);
    // Only downscale: a small image is not enlarged to 768.
    assert_eq!(
        tile(300, 200, ImageDetail::High, 85, 170).resized,
        (300, 200)
    );
    assert!(matches!(
        openai_tile(0, 5, ImageDetail::High, 85, 170),
        Err(MediaError::ZeroDimension { .. })
    ));
    assert!(matches!(
        openai_tile(5, 0, ImageDetail::Low, 85, 170),
        Err(MediaError::ZeroDimension { .. })
    ));
    assert_eq!(
        openai_tile(1024, 1024, ImageDetail::High, 1, u64::MAX),
        Err(MediaError::Overflow)
    );
}

#[test]
fn openai_tile_gpt_image_short_side_512() {
    // Same guide, "GPT Image 1": shortest side scaled to 512 instead of 768.
    let t = openai_tile_sized(1024, 1024, ImageDetail::High, 65, 129, 512).unwrap();
    assert_eq!(t.resized, (512, 512));
    assert_eq!(t.tokens, 65 + 129);
}

// --- OpenAI patch formula ----------------------------------------------------
// Source: OpenAI "Images and vision" guide, "Calculating costs",
// "GPT-4.1-mini, GPT-4.1-nano, o4-mini", "Cost calculation examples".

#[test]
fn openai_patch_documented_1024_square_is_1024() {
    let t = openai_patch(1024, 1024, 1000).unwrap();
    assert_eq!(t.tokens, 1024);
    assert_eq!(t.resized, (1024, 1024));
    assert_eq!(t.formula, "openai.patch@2025-08");
}

#[test]
fn openai_patch_documented_1800x2400_is_1452() {
    // Shrink to 1056 x 1408 = 33 x 44 patches.
    let t = openai_patch(1800, 2400, 1000).unwrap();
    assert_eq!(t.tokens, 1452);
    assert_eq!(t.resized, (1056, 1408));
    // Transposed: the height is then the whole-patch side.
    let t = openai_patch(2400, 1800, 1000).unwrap();
    assert_eq!(t.tokens, 1452);
    assert_eq!(t.resized, (1408, 1056));
}

#[test]
fn openai_patch_multipliers_round_up() {
    // gpt-4.1-mini 1.62, gpt-4.1-nano 2.46, o4-mini 1.72 (same section).
    assert_eq!(openai_patch(1800, 2400, 1620).unwrap().tokens, 2353); // 2352.24
    assert_eq!(openai_patch(1024, 1024, 2460).unwrap().tokens, 2520); // 2519.04
    assert_eq!(openai_patch(1024, 1024, 1720).unwrap().tokens, 1762); // 1761.28
    assert_eq!(openai_patch(1024, 1024, 1500).unwrap().tokens, 1536); // exact
}

#[test]
fn openai_patch_edges() {
    assert_eq!(openai_patch(1, 1, 1000).unwrap().tokens, 1);
    assert_eq!(openai_patch(32, 32, 1000).unwrap().tokens, 1);
    assert_eq!(openai_patch(33, 32, 1000).unwrap().tokens, 2);
    // Exactly at the cap: not resized.
    let t = openai_patch(1536, 1024, 1000).unwrap();
    assert_eq!((t.tokens, t.resized), (1536, (1536, 1024)));
    // Every result is within the cap.
    for (w, h) in [
        (4096, 4096),
        (1537, 1025),
        (8000, 3),
        (3, 8000),
        (100_000, 1),
    ] {
        let t = openai_patch(w, h, 1000).unwrap();
        assert!(t.tokens <= OPENAI_PATCH_CAP, "{w}x{h}: {}", t.tokens);
        assert!(t.tokens > 0);
    }
    assert!(matches!(
        openai_patch(0, 1, 1000),
        Err(MediaError::ZeroDimension { .. })
    ));
    assert!(matches!(
        openai_patch(1, 1, 0),
        Err(MediaError::InvalidParameter(_))
    ));
}

// --- Anthropic -----------------------------------------------------------------
// Source: Anthropic "Vision" guide, "Calculate image costs" table and
// "Evaluate image size" table (maximum sizes that are not resized).

#[test]
fn anthropic_documented_cost_table() {
    assert_eq!(anthropic_image(200, 200).unwrap().tokens, 54);
    assert_eq!(anthropic_image(1000, 1000).unwrap().tokens, 1334);
    assert_eq!(anthropic_image(1092, 1092).unwrap().tokens, 1590);
    assert_eq!(
        anthropic_image(200, 200).unwrap().formula,
        "anthropic.area750@2024-03"
    );
}

#[test]
fn anthropic_documented_sizes_are_not_resized() {
    for (w, h) in [
        (1092, 1092),
        (951, 1268),
        (896, 1344),
        (819, 1456),
        (784, 1568),
    ] {
        assert_eq!(anthropic_image(w, h).unwrap().resized, (w, h));
        assert_eq!(anthropic_image(h, w).unwrap().resized, (h, w));
    }
}

#[test]
fn anthropic_resizes_large_images() {
    let t = anthropic_image(3000, 3000).unwrap();
    assert_eq!(t.resized, (1108, 1108));
    assert_eq!(t.tokens, 1637);
    // Long edge only: 3136x100 -> 1568x50.
    assert_eq!(anthropic_image(3136, 100).unwrap().resized, (1568, 50));
    for (w, h) in [(8000, 8000), (8000, 1), (1, 8000), (4000, 3000)] {
        let t = anthropic_image(w, h).unwrap();
        assert!(t.resized.0.max(t.resized.1) <= ANTHROPIC_MAX_EDGE);
        assert!(u64::from(t.resized.0) * u64::from(t.resized.1) <= ANTHROPIC_MAX_PIXELS);
    }
}

#[test]
fn anthropic_edges() {
    assert_eq!(anthropic_image(1, 1).unwrap().tokens, 1);
    assert_eq!(anthropic_image(750, 1).unwrap().tokens, 1);
    assert_eq!(anthropic_image(751, 1).unwrap().tokens, 2);
    assert!(matches!(
        anthropic_image(8001, 10),
        Err(MediaError::TooLarge { max: 8000, .. })
    ));
    assert!(matches!(
        anthropic_image(0, 10),
        Err(MediaError::ZeroDimension { .. })
    ));
}

// Source (as quoted from the guide's "Resolution and token cost" section in public
// issues teamchong/pxpipe#26 / PR #27 and bradautomates/claude-video#176).
#[test]
fn anthropic_patch_reported_examples() {
    let std = AnthropicTier::STANDARD;
    assert_eq!(anthropic_patch(200, 200, std).unwrap().tokens, 64);
    assert_eq!(anthropic_patch(1000, 1000, std).unwrap().tokens, 1296);
    assert_eq!(anthropic_patch(1092, 1092, std).unwrap().tokens, 1521);
    assert_eq!(anthropic_patch(1568, 728, std).unwrap().tokens, 1456);
    let hi = anthropic_patch(1928, 1928, AnthropicTier::HIGH_RES).unwrap();
    assert_eq!((hi.tokens, hi.resized), (4761, (1928, 1928)));
    let st = anthropic_patch(1928, 1928, std).unwrap();
    assert_eq!((st.tokens, st.resized), (1521, (1092, 1092)));
}

#[test]
fn anthropic_patch_limits_hold() {
    for tier in [AnthropicTier::STANDARD, AnthropicTier::HIGH_RES] {
        for (w, h) in [
            (8000, 8000),
            (8000, 1),
            (1, 8000),
            (4032, 3024),
            (1920, 1080),
        ] {
            let t = anthropic_patch(w, h, tier).unwrap();
            assert!(t.tokens <= tier.max_tokens, "{w}x{h}");
            let edge = t.resized.0.max(t.resized.1).div_ceil(28) * 28;
            assert!(edge <= tier.max_edge, "{w}x{h}");
        }
    }
    assert_eq!(
        anthropic_patch(1, 1, AnthropicTier::STANDARD)
            .unwrap()
            .tokens,
        1
    );
}

// --- Gemini ---------------------------------------------------------------------
// Source: Gemini API "Understand and count tokens", "Count multimodal tokens";
// worked values from "Gemini by Example", "Calculating multimodal input tokens".

#[test]
fn gemini_image_rule() {
    assert_eq!(gemini_image(384, 384).unwrap().tokens, 258);
    assert_eq!(gemini_image(1, 1).unwrap().tokens, 258);
    assert_eq!(gemini_image(600, 400).unwrap().tokens, 258); // Gemini by Example
    assert_eq!(gemini_image(385, 10).unwrap().tokens, 258);
    assert_eq!(gemini_image(768, 768).unwrap().tokens, 258);
    assert_eq!(gemini_image(769, 768).unwrap().tokens, 516);
    let t = gemini_image(1024, 1024).unwrap();
    assert_eq!((t.tokens, t.resized), (1032, (1536, 1536)));
    assert_eq!(gemini_image(10_000, 1).unwrap().tokens, 14 * 258);
    assert_eq!(t.formula, "gemini.image@2025-02");
    assert!(gemini_image(0, 0).is_err());
}

#[test]
fn gemini_15_image_rule() {
    // Crop unit = min side / 1.5, clamped to [256, 768].
    assert_eq!(gemini_15_image(384, 384).unwrap().tokens, 258);
    assert_eq!(gemini_15_image(1024, 1024).unwrap().tokens, 4 * 258); // unit 682
    assert_eq!(gemini_15_image(600, 400).unwrap().tokens, 6 * 258); // unit 266
    assert_eq!(gemini_15_image(3000, 3000).unwrap().tokens, 16 * 258); // unit 768
    assert_eq!(gemini_15_image(1000, 10).unwrap().tokens, 4 * 258); // unit 256
}

#[test]
fn gemini_audio_video_rates() {
    // Gemini by Example: 30 s audio -> 960, 10 s video -> 2630.
    assert_eq!(gemini_audio(30_000), 960);
    assert_eq!(gemini_video(10_000), 2630);
    assert_eq!(gemini_audio(1_000), 32);
    assert_eq!(gemini_video(1_000), 263);
    assert_eq!(gemini_audio(0), 0);
    assert_eq!(gemini_video(0), 0);
    // Fractions round up.
    assert_eq!(gemini_audio(1), 1);
    assert_eq!(gemini_audio(1_500), 48);
    assert_eq!(gemini_video(1_500), 395); // 394.5
    assert!(gemini_video(u64::MAX) > 0); // no overflow panic
}

// --- Qwen-VL --------------------------------------------------------------------
// Source: Qwen2-VL / Qwen2.5-VL model cards ("4-16384" visual tokens per image by
// default) and `smart_resize` in qwen-vl-utils. No worked example is published;
// these values are computed by hand from the procedure.

#[test]
fn qwen_vl_bounds_from_model_card() {
    let t = qwen_vl_image(1, 1).unwrap();
    assert_eq!((t.tokens, t.resized), (4, (56, 56)));
    let t = qwen_vl_image(8000, 8000).unwrap();
    assert_eq!((t.tokens, t.resized), (16384, (3584, 3584)));
    assert_eq!(t.formula, "qwen.vl-smart-resize@2024-09");
}

#[test]
fn qwen_vl_rounding_to_28() {
    assert_eq!(qwen_vl_image(224, 224).unwrap().tokens, 64);
    let t = qwen_vl_image(1000, 1000).unwrap();
    assert_eq!((t.tokens, t.resized), (1296, (1008, 1008)));
    // Halves round to even, like Python's round(): 42 -> 56 (1.5 -> 2),
    // 70 -> 56 (2.5 -> 2), 98 -> 112 (3.5 -> 4).
    assert_eq!(qwen_vl_image(42, 70).unwrap().resized, (56, 56));
    assert_eq!(qwen_vl_image(98, 98).unwrap().resized, (112, 112));
    // 1920x1080: 69 x 39 units.
    let t = qwen_vl_image(1920, 1080).unwrap();
    assert_eq!((t.tokens, t.resized), (69 * 39, (1932, 1092)));
}

#[test]
fn qwen_vl_custom_bounds_and_errors() {
    // A 1280-token budget (the model card's suggested max of 1280 * 28 * 28 px).
    let t = qwen_vl_image_with(1920, 1080, 256 * 784, 1280 * 784).unwrap();
    assert!(t.tokens <= 1280 && t.tokens >= 256, "{}", t.tokens);
    assert_eq!(t.resized.0 % 28, 0);
    assert_eq!(t.resized.1 % 28, 0);
    assert_eq!(t.tokens, 47 * 26);
    assert!(qwen_vl_image(200, 1).is_ok());
    assert!(matches!(
        qwen_vl_image(201, 1),
        Err(MediaError::AspectRatio { max_ratio: 200, .. })
    ));
    assert!(matches!(
        qwen_vl_image(0, 1),
        Err(MediaError::ZeroDimension { .. })
    ));
    assert!(matches!(
        qwen_vl_image_with(10, 10, 2000, 1000),
        Err(MediaError::InvalidParameter(_))
    ));
}

// --- Model table ------------------------------------------------------------------

#[test]
fn model_table() {
    use ImageFormula::*;
    let cases: &[(&str, Option<ImageFormula>)] = &[
        (
            "gpt-4o",
            Some(OpenAiTile {
                base: 85,
                per_tile: 170,
            }),
        ),
        (
            "gpt-4o-2024-08-06",
            Some(OpenAiTile {
                base: 85,
                per_tile: 170,
            }),
        ),
        (
            "gpt-4o-mini-2024-07-18",
            Some(OpenAiTile {
                base: 2833,
                per_tile: 5667,
            }),
        ),
        (
            "gpt-4.1",
            Some(OpenAiTile {
                base: 85,
                per_tile: 170,
            }),
        ),
        (
            "gpt-4.1-mini-2025-04-14",
            Some(OpenAiPatch {
                multiplier_milli: 1620,
            }),
        ),
        (
            "gpt-4.1-nano",
            Some(OpenAiPatch {
                multiplier_milli: 2460,
            }),
        ),
        (
            "o4-mini",
            Some(OpenAiPatch {
                multiplier_milli: 1720,
            }),
        ),
        (
            "gpt-5",
            Some(OpenAiTile {
                base: 70,
                per_tile: 140,
            }),
        ),
        (
            "gpt-5-mini",
            Some(OpenAiPatch {
                multiplier_milli: 1620,
            }),
        ),
        (
            "o3",
            Some(OpenAiTile {
                base: 75,
                per_tile: 150,
            }),
        ),
        ("o3-mini", None),
        (
            "computer-use-preview",
            Some(OpenAiTile {
                base: 65,
                per_tile: 129,
            }),
        ),
        ("claude-sonnet-4-5", Some(Anthropic)),
        ("anthropic/claude-3-5-haiku", Some(Anthropic)),
        ("gemini-2.5-flash", Some(Gemini)),
        ("gemini-1.5-pro", Some(Gemini15)),
        ("qwen-vl-max", Some(QwenVl)),
        ("Qwen/Qwen2.5-VL-7B-Instruct", Some(QwenVl)),
        ("qwen2-vl-72b", Some(QwenVl)),
        (
            "GPT-4O",
            Some(OpenAiTile {
                base: 85,
                per_tile: 170,
            }),
        ),
        ("llama-3.1-8b", None),
        ("", None),
    ];
    for (model, want) in cases {
        assert_eq!(image_formula_for(model), *want, "{model}");
    }
}

#[test]
fn formula_dispatch() {
    assert_eq!(
        image_tokens_for("gpt-4o", 1024, 1024, ImageDetail::High)
            .unwrap()
            .tokens,
        765
    );
    assert_eq!(
        image_tokens_for("gpt-4o", 1024, 1024, ImageDetail::Low)
            .unwrap()
            .tokens,
        85
    );
    // detail does not change patch formulas.
    assert_eq!(
        image_tokens_for("gpt-4.1-mini", 1800, 2400, ImageDetail::Low)
            .unwrap()
            .tokens,
        2353
    );
    assert_eq!(
        image_tokens_for("claude-opus-4", 1000, 1000, ImageDetail::Auto)
            .unwrap()
            .tokens,
        1334
    );
    assert_eq!(
        ImageFormula::AnthropicPatch(AnthropicTier::STANDARD)
            .tokens(1000, 1000, ImageDetail::High)
            .unwrap()
            .tokens,
        1296
    );
    assert_eq!(
        image_tokens_for("mystery", 1, 1, ImageDetail::High),
        Err(MediaError::UnknownModel("mystery".into()))
    );
}

#[test]
fn adds_to_token_map() {
    let mut map = TokenMap::new();
    let t = openai_tile(1024, 1024, ImageDetail::High, 85, 170).unwrap();
    t.add_to(&mut map, Direction::Input).unwrap();
    t.add_to(&mut map, Direction::Input).unwrap();
    assert_eq!(map.total(), Some(1530));
}
