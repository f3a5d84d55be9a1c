// Every string the console shows, one table per language, and the locale's formats
// (numbers, dates, amounts in their own currency) through Intl.

const en = {
  title: "Ciyuan console",
  signInTitle: "Sign in",
  signInHelp: "Paste a Ciyuan key (cy_…). It is exchanged for a session and not kept by the page.",
  keyLabel: "Ciyuan key",
  signIn: "Sign in",
  signOut: "Sign out",
  language: "Language",
  signedInAs: "Key {key} at {account} ({scopes})",
  nav: "Sections",
  overview: "Overview",
  accounts: "Accounts",
  usage: "Usage",
  keys: "Keys",
  budgets: "Budgets & wallets",
  statements: "Statements",
  quality: "Quality",
  audit: "Audit",
  loading: "Loading…",
  error: "Error: {detail}",
  none: "Nothing yet.",
  today: "Today",
  thisMonth: "This month",
  tokens: "Tokens",
  cost: "Cost",
  topAccounts: "Top accounts this month",
  topModels: "Top models this month",
  topServices: "Top services this month",
  openIncidents: "Recent incidents",
  alerts: "Budget and wallet alerts",
  account: "Account",
  model: "Model",
  service: "Service",
  time: "Time",
  kind: "Kind",
  detail: "Detail",
  children: "Children",
  path: "Path",
  name: "Name",
  timeZone: "Time zone",
  created: "Created",
  open: "Open",
  up: "Up",
  newAccount: "New account",
  create: "Create",
  created_ok: "Created {what}.",
  groupBy: "Group by",
  bucket: "Bucket",
  hour: "Hour",
  day: "Day",
  month: "Month",
  from: "From",
  to: "To",
  show: "Show",
  downloadCsv: "Download CSV",
  total: "Total",
  keyId: "Key id",
  scopes: "Scopes",
  status: "Status",
  active: "active",
  revoked: "revoked",
  revoke: "Revoke",
  confirmRevoke: "Revoke key {key}? Its sessions end too.",
  newKey: "New key",
  secretOnce: "The new key, shown this once — copy it now:",
  limits: "Limits",
  history: "The last 30 days",
  limit: "Limit",
  period: "Period",
  mode: "Mode",
  used: "Used",
  reserved: "Reserved",
  remaining: "Remaining",
  setBudget: "Set a token budget",
  save: "Save",
  saved: "Saved.",
  accessRules: "Model access rules",
  allow: "Allow",
  deny: "Deny",
  wallet: "Wallet",
  topUp: "Top up",
  balance: "Balance",
  currency: "Currency",
  postings: "Postings",
  amount: "Amount",
  statement: "Statement",
  subtotal: "Subtotal",
  tax: "Tax",
  unitPrice: "Unit price",
  lines: "Lines",
  downloads: "Downloads",
  quantity: "Quantity",
  upstream: "Upstream",
  requests: "Requests",
  errors: "Errors",
  cut: "Cut streams",
  discrepancies: "Discrepancies / recounted",
  latency: "Latency p50 / p95 / p99 (ms)",
  ttft: "TTFT p50 / p95 (ms)",
  tokensPerSecond: "Output tokens/s (p50)",
  checkpoint: "Latest signed checkpoint",
  treeSize: "Tree size",
  rootHash: "Root hash",
  origin: "Origin",
  verifierKey: "Verifier key to trust",
  verifierHelp: "Pin the log's verifier key you obtained out of band; the one the server gives is used only if this is empty.",
  pin: "Pin",
  entryId: "Entry id",
  verify: "Fetch and verify",
  verified: "Verified in this browser: signature, leaf hash and inclusion path all hold.",
  notVerified: "NOT verified: {why}",
  stepSignature: "Ed25519 signature over the checkpoint",
  stepLeaf: "SHA-256 leaf hash of the entry",
  stepInclusion: "Inclusion path to the signed root",
  yes: "yes",
  no: "no",
  entry: "Entry",
  unpinned: "(the server's key; pin your own)",
  forbidden: "This key may not see this page.",
};

const zh = {
  title: "词元控制台",
  signInTitle: "登录",
  signInHelp: "粘贴一个词元密钥（cy_…）。它会换成一个会话，页面不会保存密钥。",
  keyLabel: "词元密钥",
  signIn: "登录",
  signOut: "退出",
  language: "语言",
  signedInAs: "密钥 {key}，节点 {account}（{scopes}）",
  nav: "栏目",
  overview: "概览",
  accounts: "账户",
  usage: "用量",
  keys: "密钥",
  budgets: "预算与钱包",
  statements: "账单",
  quality: "服务质量",
  audit: "审计",
  loading: "加载中…",
  error: "错误：{detail}",
  none: "暂无数据。",
  today: "今日",
  thisMonth: "本月",
  tokens: "词元数",
  cost: "费用",
  topAccounts: "本月用量最多的账户",
  topModels: "本月用量最多的模型",
  topServices: "本月用量最多的服务",
  openIncidents: "最近的事件",
  alerts: "预算与钱包告警",
  account: "账户",
  model: "模型",
  service: "服务",
  time: "时间",
  kind: "类型",
  detail: "详情",
  children: "子账户",
  path: "路径",
  name: "名称",
  timeZone: "时区",
  created: "创建于",
  open: "打开",
  up: "上一级",
  newAccount: "新建账户",
  create: "创建",
  created_ok: "已创建 {what}。",
  groupBy: "分组",
  bucket: "时间粒度",
  hour: "小时",
  day: "天",
  month: "月",
  from: "从",
  to: "到",
  show: "查询",
  downloadCsv: "下载 CSV",
  total: "合计",
  keyId: "密钥编号",
  scopes: "权限",
  status: "状态",
  active: "有效",
  revoked: "已吊销",
  revoke: "吊销",
  confirmRevoke: "吊销密钥 {key}？它的会话也会结束。",
  newKey: "新建密钥",
  secretOnce: "新密钥只显示这一次，请立即复制：",
  limits: "限额",
  history: "最近 30 天",
  limit: "限额",
  period: "周期",
  mode: "模式",
  used: "已用",
  reserved: "已预留",
  remaining: "剩余",
  setBudget: "设置词元预算",
  save: "保存",
  saved: "已保存。",
  accessRules: "模型访问规则",
  allow: "允许",
  deny: "禁止",
  wallet: "钱包",
  topUp: "充值",
  balance: "余额",
  currency: "币种",
  postings: "记账记录",
  amount: "金额",
  statement: "账单",
  subtotal: "小计",
  tax: "税额",
  unitPrice: "单价",
  lines: "明细",
  downloads: "下载",
  quantity: "数量",
  upstream: "上游",
  requests: "请求数",
  errors: "错误",
  cut: "中断的流",
  discrepancies: "计数差异 / 复核数",
  latency: "延迟 p50 / p95 / p99（毫秒）",
  ttft: "首词元时间 p50 / p95（毫秒）",
  tokensPerSecond: "输出词元/秒（p50）",
  checkpoint: "最新签名检查点",
  treeSize: "树大小",
  rootHash: "根哈希",
  origin: "来源",
  verifierKey: "信任的验证公钥",
  verifierHelp: "请固定您通过其他渠道获得的日志验证公钥；留空时才使用服务器提供的公钥。",
  pin: "固定",
  entryId: "条目编号",
  verify: "获取并验证",
  verified: "已在本浏览器中验证：签名、叶哈希和包含路径均成立。",
  notVerified: "未通过验证：{why}",
  stepSignature: "检查点的 Ed25519 签名",
  stepLeaf: "条目的 SHA-256 叶哈希",
  stepInclusion: "到签名根的包含路径",
  yes: "是",
  no: "否",
  entry: "条目",
  unpinned: "（服务器提供的公钥；请固定您自己的）",
  forbidden: "此密钥无权查看本页。",
};

export const LANGUAGES = { en: { name: "English", table: en }, "zh-CN": { name: "中文", table: zh } };

function initial() {
  const saved = localStorage.getItem("ciyuan.lang");
  if (saved && LANGUAGES[saved]) return saved;
  const nav = (navigator.languages || [navigator.language || "en"]).find((l) => /^(zh|en)/i.test(l));
  return nav && /^zh/i.test(nav) ? "zh-CN" : "en";
}

let lang = initial();

/** The language in use (`en` or `zh-CN`). */
export function language() {
  return lang;
}

/** Switches the language (kept for the next visit). */
export function setLanguage(l) {
  if (!LANGUAGES[l]) return;
  lang = l;
  localStorage.setItem("ciyuan.lang", l);
  document.documentElement.lang = l;
}

/** The string `key` in the language in use, `{name}`s filled from `args`. */
export function t(key, args = {}) {
  const s = LANGUAGES[lang].table[key] ?? LANGUAGES.en.table[key] ?? key;
  return s.replace(/\{(\w+)\}/g, (_, k) => String(args[k] ?? ""));
}

/** A count in the locale. Exact for integers beyond 2^53 when given a BigInt or a string. */
export function num(n) {
  if (typeof n === "string" && /^-?\d+$/.test(n)) n = BigInt(n);
  return new Intl.NumberFormat(lang).format(n);
}

/** An amount in its currency; the decimal string is formatted without going through a float when Intl allows. */
export function money(amount, currency) {
  try {
    return new Intl.NumberFormat(lang, { style: "currency", currency, maximumFractionDigits: 6 }).format(amount);
  } catch {
    return `${amount} ${currency}`;
  }
}

/** A moment in the locale, in `timeZone` (the node's) when given. */
export function when(ts, timeZone) {
  if (!ts) return "";
  const d = new Date(ts);
  const opts = { dateStyle: "medium", timeStyle: "short" };
  if (timeZone) opts.timeZone = timeZone;
  try {
    return new Intl.DateTimeFormat(lang, opts).format(d);
  } catch {
    return new Intl.DateTimeFormat(lang, { dateStyle: "medium", timeStyle: "short" }).format(d);
  }
}
